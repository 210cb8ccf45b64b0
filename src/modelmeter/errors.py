"""One error tree, one handler, one table from error type to HTTP status.

    ModelMeterError                      (base: message, code, param)
    ├── InvalidRequestError              invalid_request_error      422
    │   ├── MalformedRequestError        invalid_request_error      400  (unparseable JSON, bad multipart)
    │   │   └── InvalidIdempotencyKeyError  invalid_request_error   400  code=invalid_idempotency_key
    │   └── IdempotencyKeyReusedError    invalid_request_error      422  code=idempotency_key_reused
    ├── AuthenticationError              authentication_error       401
    ├── PermissionDeniedError            permission_error           403
    │   └── TenantSuspendedError         permission_error           403  code=tenant_suspended
    ├── NotFoundError                    not_found_error            404
    ├── MethodNotAllowedError            invalid_request_error      405
    ├── ConflictError                    conflict_error             409
    │   └── IdempotencyKeyInUseError     conflict_error             409  code=idempotency_key_in_use
    ├── PayloadTooLargeError             request_too_large          413
    ├── UnsupportedMediaTypeError        invalid_request_error      415  code=unsupported_media_type
    ├── RateLimitError                   rate_limit_exceeded        429  (Retry-After)
    ├── InsufficientQuotaError           insufficient_quota         429  (do not retry)
    ├── OverloadedError                  overloaded                 429  (Retry-After)
    ├── ClientDisconnectedError          client_closed_request      499  (nobody reads it)
    ├── ServiceUnavailableError          service_unavailable        503
    └── InternalError                    internal_error             500

Every refusal leaves the service as one JSON envelope:
``{"error": {"message": str, "type": str, "code": str | null, "param": str | null}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

log = logging.getLogger("modelmeter.errors")


class ModelMeterError(Exception):
    """Base of every error the platform reports to a client."""

    type = "api_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class InvalidRequestError(ModelMeterError):
    type = "invalid_request_error"


class MalformedRequestError(InvalidRequestError):
    default_code = "malformed_request"


class InvalidIdempotencyKeyError(MalformedRequestError):
    """An ``Idempotency-Key`` header that is empty, too long, repeated or not printable ASCII."""

    default_code = "invalid_idempotency_key"


class IdempotencyKeyReusedError(InvalidRequestError):
    """The caller's ``Idempotency-Key`` was first used for another request (another body or route)."""

    default_code = "idempotency_key_reused"


class AuthenticationError(ModelMeterError):
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(ModelMeterError):
    type = "permission_error"


class TenantSuspendedError(PermissionDeniedError):
    default_code = "tenant_suspended"


class NotFoundError(ModelMeterError):
    type = "not_found_error"
    default_code = "not_found"


class MethodNotAllowedError(ModelMeterError):
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class ConflictError(ModelMeterError):
    type = "conflict_error"
    default_code = "conflict"


class IdempotencyKeyInUseError(ConflictError):
    """The first request with this ``Idempotency-Key`` is still running; retry once it has answered."""

    default_code = "idempotency_key_in_use"


class PayloadTooLargeError(ModelMeterError):
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaTypeError(ModelMeterError):
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimitError(ModelMeterError):
    type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"


class InsufficientQuotaError(ModelMeterError):
    type = "insufficient_quota"
    default_code = "insufficient_quota"


class OverloadedError(ModelMeterError):
    type = "overloaded"
    default_code = "overloaded"


class ClientDisconnectedError(ModelMeterError):
    type = "client_closed_request"
    default_code = "client_closed_request"


class ServiceUnavailableError(ModelMeterError):
    type = "service_unavailable"
    default_code = "service_unavailable"


class InternalError(ModelMeterError):
    type = "internal_error"
    default_code = "internal_error"


# The one table from error class to HTTP status; the most specific class listed wins (MRO order).
STATUS: dict[type[ModelMeterError], int] = {
    ModelMeterError: 500,
    InvalidRequestError: 422,
    MalformedRequestError: 400,
    AuthenticationError: 401,
    PermissionDeniedError: 403,
    NotFoundError: 404,
    MethodNotAllowedError: 405,
    ConflictError: 409,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    RateLimitError: 429,
    InsufficientQuotaError: 429,
    OverloadedError: 429,
    ClientDisconnectedError: 499,
    ServiceUnavailableError: 503,
    InternalError: 500,
}


def status_of(error: ModelMeterError) -> int:
    """HTTP status of an error, from ``STATUS``."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(error: ModelMeterError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=status_of(error), headers=error.headers)


def _param_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def from_validation(exc: RequestValidationError) -> ModelMeterError:
    """Translate FastAPI's validation error into ours, naming the first offending field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = str(first.get("type", ""))
    param = _param_of(first.get("loc", ()))
    if kind in ("json_invalid", "json_type"):
        return MalformedRequestError("Request body is not valid JSON.", param=None)
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type", "missing"):  # no object
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_body", param=None)
    message = str(first.get("msg", "Invalid request."))
    if kind == "extra_forbidden":
        message = f"Unknown field '{param}'."
        return InvalidRequestError(message, code="unknown_field", param=param)
    text = f"{param}: {message}" if param else message
    return InvalidRequestError(text, code="invalid_value", param=param)


_HTTP_CLASSES: dict[int, type[ModelMeterError]] = {
    400: MalformedRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidRequestError,
}


def from_http(exc: StarletteHTTPException) -> ModelMeterError:
    cls = _HTTP_CLASSES.get(exc.status_code, InternalError if exc.status_code >= 500 else InvalidRequestError)
    message = "Unknown route." if exc.status_code == 404 else str(exc.detail)
    return cls(message, headers=exc.headers)


def allowed_methods(request: Request, raised: Mapping[str, str] | None) -> list[str]:
    """Every method the app answers on this request's path: the documented operations of each path template
    that matches (the OpenAPI document is built once and cached), plus the ``Allow`` of the route that refused."""
    methods = {m.strip() for m in (raised or {}).get("Allow", "").split(",") if m.strip()}
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(request.url.path):
            methods |= {m.upper() for m in operations if m.upper() in _HTTP_METHODS}
    return sorted(methods)


_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


# What a client of PostgreSQL or Redis raises when the server is unreachable, restarting or partitioned away.
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)
_DATABASE_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def unavailable_dependency(exc: BaseException) -> ServiceUnavailableError | None:
    """The 503 for an error that says PostgreSQL or Redis cannot be reached (None for any other error).

    product.md: a dependency fault is 503 ``service_unavailable`` with ``Retry-After``, never a 500. The request
    that met it changed nothing it answers for: a usage row that could not be written fails the request (the
    ledger's contract), and a reservation is released or expires."""
    if isinstance(exc, _REDIS_DOWN):
        what = "Redis (limits and quotas)"
    elif isinstance(exc, _DATABASE_DOWN) or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated):
        what = "the database"
    else:
        return None
    return ServiceUnavailableError(f"The service is temporarily unavailable: {what} cannot be reached. Retry "
                                   "shortly.", headers={"Retry-After": "1"})


async def _ours(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelMeterError)
    return error_response(exc)


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(from_validation(exc))


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error = from_http(exc)
    if exc.status_code == 405:  # every method of the path, not only those of the first route that matched it
        error.headers["Allow"] = ", ".join(allowed_methods(request, exc.headers))
    return error_response(error)


def unstorable_value(exc: BaseException) -> ModelMeterError | None:
    """A value the database refused (PostgreSQL holds no NUL in text and 32-bit integers): the statement
    failed, its transaction rolled back, nothing changed; the client sent it, so a client error."""
    if not isinstance(exc, DataError):
        return None
    text = str(exc)
    if "NUL (0x00)" in text:
        return MalformedRequestError("Text may not contain NUL (U+0000) characters.", code="invalid_text")
    if "out of range" in text:
        return InvalidRequestError("A number is outside the range the service stores.", code="value_out_of_range")
    return None


def error_for(exc: BaseException) -> ModelMeterError:
    """What a request answers for an exception that is not already ours (the app's handlers and the fast lane):
    a refused value is the client's error, a dependency fault a 503, anything else a 500 with its traceback
    logged."""
    if isinstance(exc, ModelMeterError):
        return exc
    refused = unstorable_value(exc)
    if refused is not None:
        return refused
    unavailable = unavailable_dependency(exc)
    if unavailable is not None:
        log.warning("answered 503: %s: %s", type(exc).__name__, (str(exc).splitlines() or [""])[0])
        return unavailable
    log.exception("unhandled error", exc_info=exc)
    return InternalError("The server had an error while processing the request.")


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    """The catch-all, also what Starlette's outermost middleware answers for an error raised in a middleware."""
    return error_response(error_for(exc))


def install_handlers(app: FastAPI) -> None:
    """Register the one handler for every error path of the app."""
    app.add_exception_handler(ModelMeterError, _ours)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(DataError, _unexpected)
    for kind in (*_REDIS_DOWN, *_DATABASE_DOWN, sa_exc.DBAPIError):
        app.add_exception_handler(kind, _unexpected)
    app.add_exception_handler(Exception, _unexpected)
