"""Tenant inference: ``/v1/models``, ``/v1/classify``, ``/v1/embeddings`` (OpenAI) and ``/models/{id}`` (Hugging Face).

The request path: authenticate → resolve the model (in-memory registry) → tokenize and count → batcher
(one forward pass shared with concurrent requests) → commit the usage row (group commit) → respond with
``usage`` and the ``x-compute-tokens``/``x-queue-time``/``x-inference-time`` headers.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictStr

from modelmeter.errors import InvalidRequestError
from modelmeter.fields import INTEGRAL
from modelmeter.gateway.deps import CurrentPrincipal, InferencePrincipal, ServicesDep, list_body
from modelmeter.gateway.inference import Served, serve
from modelmeter.gateway.schemas import (
    TENANT_READ,
    TENANT_WRITE,
    ClassifyResponse,
    EmbeddingsResponse,
    HFResponse,
    Page,
    errors,
)
from modelmeter.models.registry import ModelInfo, ModelPublic

router = APIRouter(tags=["inference"])

Text = Annotated[StrictStr, Field(min_length=1)]
Inputs = Text | Annotated[list[Text], Field(min_length=1)]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    input: Inputs
    truncate: StrictBool = False


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; token-array inputs and ``dimensions`` other than the model's are refused."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Strict(), Field(gt=0), INTEGRAL] | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None
    truncate: StrictBool = False


class HFParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: Annotated[int, Strict(), Field(gt=0), INTEGRAL] | None = None
    function_to_apply: Literal["softmax"] | None = None
    truncate: StrictBool | None = None
    truncation: StrictBool | None = None


class HFRequest(BaseModel):
    """The Hugging Face inference payload; feature-extraction knobs come at the root, classification's in
    ``parameters`` (as ``huggingface_hub.InferenceClient`` sends them)."""

    model_config = ConfigDict(extra="forbid")
    inputs: Inputs
    parameters: HFParameters | None = None
    options: dict[str, StrictBool] | None = None
    normalize: StrictBool | None = None
    truncate: StrictBool | None = None
    truncation_direction: Literal["right", "Right"] | None = None
    prompt_name: None = None
    dimensions: None = None
    encoding_format: Literal["float"] | None = None

    def wants_truncation(self) -> bool:
        params = self.parameters or HFParameters()
        return bool(self.truncate or params.truncate or params.truncation)


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def _usage(served: Served) -> dict[str, int]:
    return {"prompt_tokens": served.tokens, "total_tokens": served.tokens}


class _FastJSON(JSONResponse):
    """orjson instead of the standard library's encoder: an embedding's 384 floats cost ~300 us with ``json``
    and ~10 us with orjson (measured in bench/fronts.py's stage profile); the same shortest-repr float text."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def serving_headers(served: Served) -> dict[str, str]:
    """The rate-limit headers and the serving figures every inference answer carries."""
    return {
        **served.headers,
        "x-compute-tokens": str(served.tokens),
        "x-queue-time": f"{served.queue_s * 1000:.3f}",
        "x-inference-time": f"{served.inference_s * 1000:.3f}",
    }


def _respond(body: Any, served: Served) -> JSONResponse:
    """Serialise directly (no per-float encoder walk: embeddings are long lists) with the serving headers."""
    return _FastJSON(body, headers=serving_headers(served))


def task_check(wanted: str, route: str) -> Callable[[ModelInfo], None]:
    """The check ``serve`` runs on the resolved model: a route serves one task (400 naming the model's)."""

    def check(model: ModelInfo) -> None:
        if model.task != wanted:
            raise InvalidRequestError(
                f"The model '{model.id}' is a {model.task} model; {route} needs a {wanted} model.",
                code="unsupported_task",
                param="model",
            )

    return check


# The inference routes return their JSONResponse directly: FastAPI documents ``response_model`` and skips
# re-validating the body (an embeddings answer is thousands of floats) on the hot path.
_INFERENCE_ERRORS = errors(*TENANT_WRITE, 404, 503)


@router.get("/v1/models", response_model=Page[ModelPublic], responses=errors(*TENANT_READ))
async def get_models(principal: CurrentPrincipal, services: ServicesDep) -> dict[str, Any]:
    """The tenant's own models plus the platform's."""
    models = await services.models.visible(principal.tenant_id)
    return list_body([m.public() for m in models], False)


@router.post("/v1/classify", response_model=ClassifyResponse, responses=_INFERENCE_ERRORS)
async def classify(body: ClassifyRequest, principal: InferencePrincipal, request: Request) -> JSONResponse:
    """Label each input with the model's classes: ``label``, ``score`` and every class's probability."""
    served = await serve(
        request, principal, body.model, _as_list(body.input), truncate=body.truncate, endpoint="classify",
        check=task_check("text-classification", "/v1/classify"),
    )
    return _respond(classify_answer(body.model, served), served)


def classify_answer(model: str, served: Served) -> dict[str, Any]:
    data = []
    for index, scores in enumerate(served.results):
        assert isinstance(scores, dict)
        label = max(scores, key=scores.__getitem__)
        data.append({"index": index, "label": label, "score": scores[label], "scores": scores})
    return {"object": "list", "model": model, "data": data, "usage": _usage(served)}


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=_INFERENCE_ERRORS)
async def embeddings(body: EmbeddingsRequest, principal: InferencePrincipal, request: Request) -> JSONResponse:
    """OpenAI-compatible embeddings (mean-pooled, L2-normalised)."""
    served = await serve(
        request, principal, body.model, _as_list(body.input), truncate=body.truncate, endpoint="embeddings",
        check=task_check("feature-extraction", "/v1/embeddings"), dimensions=body.dimensions,
    )
    return _respond(embeddings_answer(body.model, body.encoding_format, served), served)


def embeddings_answer(model: str, encoding_format: str, served: Served) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)}  # type: ignore[arg-type]
        for i, v in enumerate(served.results)
    ]
    return {"object": "list", "data": data, "model": model, "usage": _usage(served)}


@router.post("/models/{model:path}", response_model=HFResponse, responses=_INFERENCE_ERRORS)
async def hf_inference(model: str, body: HFRequest, principal: InferencePrincipal, request: Request) -> JSONResponse:
    """Hugging Face inference format: classification answers ``[[{label, score}…]]``, feature extraction
    answers one vector per input."""
    served = await serve(
        request, principal, model, _as_list(body.inputs), truncate=body.wants_truncation(), endpoint="hf",
    )
    if served.task == "feature-extraction":
        return _respond(served.results, served)
    top_k = body.parameters.top_k if body.parameters else None
    ranked = []
    for scores in served.results:
        assert isinstance(scores, dict)
        pairs = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        ranked.append([{"label": label, "score": score} for label, score in pairs])
    return _respond(ranked, served)
