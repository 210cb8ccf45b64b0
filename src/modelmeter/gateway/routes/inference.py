"""Tenant inference: ``/v1/models``, ``/v1/classify``, ``/v1/entities``, ``/v1/embeddings`` (OpenAI) and
``/models/{id}`` (Hugging Face).

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
from starlette.concurrency import run_in_threadpool

from modelmeter.errors import InvalidRequestError
from modelmeter.fields import INTEGRAL
from modelmeter.gateway.deps import CurrentPrincipal, InferencePrincipal, ServicesDep
from modelmeter.gateway.inference import Served, serve
from modelmeter.gateway.schemas import (
    TENANT_READ,
    TENANT_WRITE,
    ClassifyResponse,
    EmbeddingsResponse,
    EntitiesResponse,
    HFResponse,
    Page,
    errors,
)
from modelmeter.models.entities import aggregate
from modelmeter.models.outputs import TOKEN_CLASSIFICATION, TokenScores
from modelmeter.models.registry import ModelInfo, ModelPublic
from modelmeter.models.requests import ClassifyRequest, EmbeddingsRequest, EntitiesRequest, Inputs, Strategy

router = APIRouter(tags=["inference"])

class HFParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: Annotated[int, Strict(), Field(gt=0), INTEGRAL] | None = None
    aggregation_strategy: Strategy | None = None  # token classification
    ignore_labels: Annotated[list[Annotated[StrictStr, Field(max_length=100)]], Field(max_length=100)] | None = None
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
async def get_models(principal: CurrentPrincipal, services: ServicesDep) -> Page[ModelPublic]:
    """The tenant's own models plus the platform's."""
    models = await services.models.visible(principal.tenant_id)
    return Page.of([m.public() for m in models])


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


@router.post("/v1/entities", response_model=EntitiesResponse, responses=_INFERENCE_ERRORS)
async def entities(body: EntitiesRequest, principal: InferencePrincipal, request: Request) -> JSONResponse:
    """Named entities in each input: type, score, the text and its character offsets (``word`` is
    ``input[start:end]``); ``aggregation_strategy`` groups sub-tokens as Hugging Face does."""
    texts = _as_list(body.input)
    served = await serve(
        request, principal, body.model, texts, truncate=body.truncate, endpoint="entities",
        check=task_check(TOKEN_CLASSIFICATION, "/v1/entities"), spans=True,
    )
    # Grouping is per-token Python work: off the event loop, so a long request does not stall the front's others.
    found = await run_in_threadpool(_entities, texts, served, body.aggregation_strategy)
    data = [{"index": i, "entities": items} for i, items in enumerate(found)]
    return _respond({"object": "list", "model": body.model, "data": data, "usage": _usage(served)}, served)


def _entities(texts: list[str], served: Served, strategy: str,
              ignore: list[str] | None = None) -> list[list[dict[str, Any]]]:
    """Each input's entities from its tokens' scores (the engine scored every token; grouping is the front's).
    ``ignore`` replaces the default ``["O"]``, as the pipeline's ``ignore_labels`` does."""
    encoded = served.encoded
    assert encoded is not None
    assert encoded.offsets is not None
    assert encoded.special is not None
    assert encoded.pieces is not None
    out = []
    for i, (text, result) in enumerate(zip(texts, served.results, strict=True)):
        assert isinstance(result, TokenScores)
        items = aggregate(text, tokens=encoded.pieces[i], input_ids=encoded.ids[i], offsets=encoded.offsets[i],
                          special=[bool(s) for s in encoded.special[i]], scores=result.scores,
                          labels=result.labels, strategy=strategy, unk_id=served.unk_id, ignore_labels=ignore)
        out.append(items)
    return out


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
    one vector per input, token classification the entities of the input (a list of lists for a list of
    inputs) as ``InferenceClient.token_classification`` reads them."""
    texts = _as_list(body.inputs)
    served = await serve(
        request, principal, model, texts, truncate=body.wants_truncation(), endpoint="hf",
        spans=lambda info: info.task == TOKEN_CLASSIFICATION,
    )
    if served.task == "feature-extraction":
        return _respond(served.results, served)
    if served.task == TOKEN_CLASSIFICATION:
        params = body.parameters or HFParameters()
        found = await run_in_threadpool(_entities, texts, served, params.aggregation_strategy or "simple",
                                        params.ignore_labels)
        return _respond(found[0] if isinstance(body.inputs, str) else found, served)
    top_k = body.parameters.top_k if body.parameters else None
    ranked = []
    for scores in served.results:
        assert isinstance(scores, dict)
        pairs = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        ranked.append([{"label": label, "score": score} for label, score in pairs])
    return _respond(ranked, served)
