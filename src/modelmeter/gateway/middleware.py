"""Pure-ASGI middleware: body size limit (413 before parsing), request ids and a secret-free access log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelmeter.errors import PayloadTooLargeError, error_response
from modelmeter.ids import new_id

access_log = logging.getLogger("modelmeter.access")


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


class RequestContextMiddleware:
    """Give every request an id (``x-request-id``) and log method, path (never the query) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_id("req")
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
