"""The fast lane: a hand-written ASGI path for the two hottest routes, ``POST /v1/embeddings`` and ``/v1/classify``.

Why by hand (design.md: "write by hand only the hot path they lack"): bench/fronts.py's stage profile of a
saturated front put FastAPI's routing and dependency solving (~290 us), pydantic body validation (~270 us) and
the response machinery (~170 us) at ~0.7 ms of the ~1.7 ms our front spent per request, on a route whose work
is a dict lookup, a tokenizer call and a socket send. FastAPI has no cheaper mode for one route, so this lane
decodes the body with msgspec into a strict struct (~3 us) and calls the same serving pipeline
(``gateway.inference.serve``) and the same answer builders as the routes.

It changes no answer. It takes only a request the FastAPI route would take as it is, which it can prove
cheaply: a JSON body (declared ``application/json``, with Content-Length, within the body limit) that decodes
into the struct below (the same fields and bounds as the route's pydantic model, but stricter: no coercion at
all), no query string, no ``Idempotency-Key``, and a bearer key already in the authentication cache, admitted,
with the ``inference`` scope. Everything else (malformed or unknown fields, a cache miss, a refused key, an
idempotent retry, another media type) goes to the FastAPI app unchanged with its body replayed, and that
route, which stays the documented implementation, gives every refusal its answer. Errors raised once the
request is in the pipeline (unknown model, limits, quota, engine) are ours and are rendered by the same
``error_response`` the app's handlers use. tests/api/test_fastlane.py sends the same requests through both lanes
and compares status, body and headers; ``MODELMETER_FAST_LANE=false`` turns the lane off.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import orjson
from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelmeter import clock
from modelmeter.errors import ModelMeterError, error_for, error_response
from modelmeter.gateway.auth import Principal, parse_bearer
from modelmeter.gateway.inference import Served, serve
from modelmeter.gateway.routes.inference import classify_answer, embeddings_answer, serving_headers, task_check
from modelmeter.gateway.services import Services
from modelmeter.tenancy.keys import well_formed

_Text = Annotated[str, msgspec.Meta(min_length=1)]
_Inputs = _Text | Annotated[list[_Text], msgspec.Meta(min_length=1)]
_Model = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class _Classify(msgspec.Struct, forbid_unknown_fields=True):
    """``ClassifyRequest``, strictly (msgspec takes no ``1`` for a bool and no ``3.0`` for an int)."""

    model: _Model
    input: _Inputs
    truncate: bool = False


class _Embeddings(msgspec.Struct, forbid_unknown_fields=True):
    """``EmbeddingsRequest``, strictly."""

    model: _Model
    input: _Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(gt=0)] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    truncate: bool = False


_CLASSIFY = msgspec.json.Decoder(_Classify)
_EMBEDDINGS = msgspec.json.Decoder(_Embeddings)


class _Pass(Exception):
    """Not for this lane: the FastAPI app answers the request."""


class FastLane:
    """ASGI middleware answering the lane's requests itself and passing every other request on."""

    def __init__(self, app: ASGIApp, *, router: APIRouter, services: Services) -> None:
        self.app = app
        self.services = services
        self.limit = services.settings.max_body_bytes
        routes = {r.path: r for r in router.routes if isinstance(r, APIRoute) and "POST" in (r.methods or ())}
        # The route objects label the lane's requests in the HTTP metrics exactly as the router would.
        self.routes: dict[str, APIRoute] = {p: routes[p] for p in ("/v1/embeddings", "/v1/classify")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or scope["query_string"]:
            await self.app(scope, receive, send)
            return
        authorization, length = self._gate(scope)
        if length is None:
            await self.app(scope, receive, send)
            return
        body, message = await _read(receive, length)
        if message is not None:  # the client left (or sent more than it declared): let the app see it
            await self.app(scope, _replay(body, receive, message), send)
            return
        try:
            principal = self._principal(authorization)
            request_body = (_EMBEDDINGS if route.path == "/v1/embeddings" else _CLASSIFY).decode(body)
        except (_Pass, msgspec.DecodeError):  # ValidationError is a DecodeError
            await self.app(scope, _replay(body, receive, None), send)
            return
        scope["route"] = route
        await self._answer(scope, receive, send, principal, request_body)

    def _gate(self, scope: Scope) -> tuple[str | None, int | None]:
        """(Authorization, Content-Length) when the headers admit the request to the lane, else (_, None)."""
        authorization = None
        length = None
        json = False
        seen_type: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() and length is None else -1
            elif name == b"content-type":  # sent twice: the app reads the first, the lane takes neither
                json = seen_type is None and value.split(b";", 1)[0].strip().lower() == b"application/json"
                seen_type = value
            elif name == b"authorization":
                authorization = value.decode("latin-1") if authorization is None else ""
            elif name == b"idempotency-key":
                return None, None
        if not json or length is None or not 0 < length <= self.limit:
            return None, None
        return authorization, length

    def _principal(self, authorization: str | None) -> Principal:
        token = parse_bearer(authorization)
        if token is None or not well_formed(token):
            raise _Pass
        hit, principal = self.services.auth.cached(token)
        if not hit or principal is None or "inference" not in principal.scopes:
            raise _Pass
        if not principal.admitted_at(clock.now_s()):
            raise _Pass
        try:
            return self.services.auth.check(principal)
        except ModelMeterError:  # expired between the two clock reads: the route answers it
            raise _Pass from None

    async def _answer(self, scope: Scope, receive: Receive, send: Send, principal: Principal,
                      body: _Classify | _Embeddings) -> None:
        request = Request(scope, receive)
        request.state.principal = principal
        texts = [body.input] if isinstance(body.input, str) else body.input
        try:
            if isinstance(body, _Embeddings):
                served = await serve(request, principal, body.model, texts, truncate=body.truncate,
                                     endpoint="embeddings", dimensions=body.dimensions,
                                     check=task_check("feature-extraction", "/v1/embeddings"))
                answer = embeddings_answer(body.model, body.encoding_format, served)
            else:
                served = await serve(request, principal, body.model, texts, truncate=body.truncate,
                                     endpoint="classify", check=task_check("text-classification", "/v1/classify"))
                answer = classify_answer(body.model, served)
        except Exception as exc:  # ours, or what the app's handlers would answer for it
            await error_response(error_for(exc))(scope, receive, send)
            return
        await _send_json(send, answer, served)


async def _send_json(send: Send, answer: Any, served: Served) -> None:
    content = orjson.dumps(answer)
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in serving_headers(served).items()]
    headers.append((b"content-length", str(len(content)).encode()))
    headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def _read(receive: Receive, length: int) -> tuple[bytes, Message | None]:
    """The declared body, or what came of it and the message that ended it early (a disconnect)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > length:
            return b"".join(chunks), {"type": "http.request", "body": b"", "more_body": False}
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive: Receive, last: Message | None) -> Receive:
    """A receive that gives the app the body already read (then ``last``, then the connection's own)."""
    queue: list[Message] = [{"type": "http.request", "body": body, "more_body": last is not None}]
    if last is not None:
        queue.append(last)

    async def replayed() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replayed
