"""The error envelope and the inference shapes: what the hot routes answer, declared once so that OpenAPI,
generated clients and the contract tests (schemathesis, in CI) agree with what the service sends.

The inference routes return their ``JSONResponse`` directly, so FastAPI documents these schemas without
re-validating every float of an embedding on the hot path. Every other resource's public model lives beside its
table (``XPublic.of(row)``; ``modelmeter.shapes`` has the base and the list envelope).
"""

from __future__ import annotations

from typing import Any, Literal

from modelmeter.shapes import Page, Public

__all__ = ["ADMIN_READ", "ADMIN_WRITE", "TENANT_READ", "TENANT_WRITE", "Page", "Public", "errors"]


# --- errors ----------------------------------------------------------------------------------------


class ErrorDetail(Public):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorBody(Public):
    """The one error envelope."""

    error: ErrorDetail


_WHY = {
    400: "Malformed request: the body is not JSON or not a form, or a header is invalid (Idempotency-Key).",
    401: "Missing, malformed, unknown, revoked or expired API key.",
    403: "The key lacks the scope, the tenant is suspended, or a tenant key called an admin route.",
    404: "No such object or model (another tenant's objects answer exactly as missing ones).",
    409: "The object's state forbids it, or this Idempotency-Key's first request is still in flight.",
    413: "The body is over the size limit.",
    415: "The body is in a media type this route does not take.",
    422: "An invalid or unknown field (named in `param`), or an Idempotency-Key reused with another body.",
    429: "`rate_limit_exceeded` or `overloaded` (retry after Retry-After), or `insufficient_quota` (do not retry).",
    503: "A part the request needs is unavailable.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the envelope schema."""
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}


TENANT_READ = (401, 403, 422, 429)  # every authenticated route: a bad query parameter is a 422; limits answer 429
TENANT_WRITE = (400, 401, 403, 409, 413, 415, 422, 429)  # a body, and a POST's Idempotency-Key
ADMIN_READ = (401, 403, 422)
ADMIN_WRITE = (400, 401, 403, 409, 413, 415, 422)


# --- inference -------------------------------------------------------------------------------------


class TokenUsage(Public):
    prompt_tokens: int
    total_tokens: int


class Classification(Public):
    index: int
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(Public):
    object: Literal["list"]
    model: str
    data: list[Classification]
    usage: TokenUsage


class Embedding(Public):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 with encoding_format=base64


class EmbeddingsResponse(Public):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: TokenUsage


class LabelScore(Public):
    label: str
    score: float


class EntityGroup(Public):
    """An entity: its type, the mean (or first, or max) score of its tokens, and where it is in the input."""

    entity_group: str
    score: float
    word: str  # input[start:end]
    start: int  # character offsets into the input
    end: int


class TokenEntity(Public):
    """One sub-token's label (``aggregation_strategy: "none"``), as Hugging Face answers it."""

    entity: str
    score: float
    index: int  # the token's position in the encoded input ([CLS] is 0)
    word: str
    start: int
    end: int


class Entities(Public):
    index: int
    entities: list[EntityGroup] | list[TokenEntity]


class EntitiesResponse(Public):
    object: Literal["list"]
    model: str
    data: list[Entities]
    usage: TokenUsage


# Hugging Face's shapes: ranked labels per input (text classification), one vector per input (features), the
# entities of one input (token classification, a string input) or of each (a list).
HFResponse = (list[list[LabelScore]] | list[list[float]] | list[EntityGroup] | list[TokenEntity]
              | list[list[EntityGroup]] | list[list[TokenEntity]])


