"""Pure-ASGI middleware: body size limit (413 before parsing), content types (a JSON body as people send it, 415
otherwise), request ids and a secret-free access log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelmeter.errors import PayloadTooLargeError, UnsupportedMediaTypeError, error_response
from modelmeter.ids import new_id

access_log = logging.getLogger("modelmeter.access")

# ASGI scope keys only the batch runner sets, on requests it makes in-process (never reachable from the network:
# uvicorn builds a network request's scope, and the runner's wrapper is not on that path).
INTERNAL_PRINCIPAL = "modelmeter.principal"
INTERNAL_REQUEST_ID = "modelmeter.request_id"


class BodyLimitMiddleware:
    """Refuse bodies over the limit: at once from Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await error_response(_too_large(limit))(scope, receive, send)
            return
        await self.app(scope, _counting(receive, limit), send)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"Request body exceeds the limit of {limit} bytes.")


def _counting(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # An HTTPException passes through FastAPI's body parsing untouched (others become 400).
                raise HTTPException(413, detail=_too_large(limit).message)
        return message

    return wrapped


JSON = "application/json"
MULTIPART = "multipart/form-data"
# What clients send a JSON body as, without saying so: nothing, or curl's default for -d.
_UNDECLARED_JSON = {"", "application/x-www-form-urlencoded"}
_WITH_BODY = {"POST", "PUT", "PATCH"}


class ContentTypeMiddleware:
    """Take a JSON body however a person sends it, and refuse other declared types.

    ``expects(method, path)`` names the media type a route reads (``None``: any, e.g. Stripe's raw webhook
    body). A JSON route accepts ``application/json`` (and ``+json`` types), and also a body with no Content-Type
    or with curl's default ``application/x-www-form-urlencoded``, which is read as JSON; any other declared type
    is answered 415 naming the type expected. A multipart route (file upload) takes only multipart.

    The refusal is recorded here and raised by the authentication dependencies once the caller is known
    (``refuse_media_type``), before any body validation: a caller without a valid key learns nothing about a
    route but its 401, and a refused body is never read as JSON or as a form.
    """

    def __init__(self, app: ASGIApp, *, expects: Callable[[str, str], str | None]) -> None:
        self.app = app
        self.expects = expects

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _WITH_BODY:
            await self.app(scope, receive, send)
            return
        expected = self.expects(scope["method"], scope["path"])
        declared = _media_type(scope)
        if expected is None or _accepts(expected, declared):
            await self.app(scope, receive, send)
        elif expected == JSON and declared in _UNDECLARED_JSON:
            await self.app(_as_json(scope), receive, send)
        else:
            error = UnsupportedMediaTypeError(
                f"This endpoint takes {expected} bodies, not '{declared}'.", param="Content-Type")
            state = scope.setdefault("state", {})
            state[_REFUSAL] = error
            await self.app(scope, receive, send)


_REFUSAL = "unsupported_media_type"


def refuse_media_type(state: Any) -> None:
    """Raise the 415 the content-type check recorded for this request, if any (called after authentication)."""
    error = getattr(state, _REFUSAL, None)
    if error is not None:
        raise error


def _media_type(scope: Scope) -> str:
    raw: bytes = dict(scope["headers"]).get(b"content-type", b"")
    return raw.decode("latin-1").split(";", 1)[0].strip().lower()


def _accepts(expected: str, declared: str) -> bool:
    if expected == JSON:
        return declared == JSON or (declared.startswith("application/") and declared.endswith("+json"))
    if expected == MULTIPART:  # a form route reads either form encoding (a file needs multipart)
        return declared in (MULTIPART, "application/x-www-form-urlencoded")
    return declared == expected


def _as_json(scope: Scope) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", JSON.encode())]}


class RequestContextMiddleware:
    """Give every request an id (``x-request-id``) and log method, path (never the query) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # A batch line's id derives from its batch and custom_id (``batches.line_request_id``): billed once, ever.
        request_id = scope.get(INTERNAL_REQUEST_ID) or new_id("req")
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _observe(scope, status, time.perf_counter() - started)
            if access_log.isEnabledFor(logging.INFO):
                millis = (time.perf_counter() - started) * 1000
                access_log.info("%s %s %d %.1fms %s", scope["method"], scope["path"], status, millis, request_id)


def _observe(scope: Scope, status: int, seconds: float) -> None:
    """Count the request by route template (never the raw path), method, status and resolved model."""
    services = getattr(scope["app"].state, "services", None) if "app" in scope else None
    if services is None:
        return
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    model = scope.get("state", {}).get("model_id")
    services.telemetry.observe_http(route=route, method=scope["method"], status=status, model=model, seconds=seconds)
