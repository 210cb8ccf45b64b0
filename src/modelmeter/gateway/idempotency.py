"""``Idempotency-Key`` on every POST: a retried request replays the first one's answer instead of running again.

The key is scoped to the caller (the API key that made the first request, or the admin token) and kept
``MODELMETER_IDEMPOTENCY_TTL_S`` (24 h). Not the tenant: another key of the same tenant may hold fewer scopes,
and a replay never reaches the route that checks them (issue 21: an inference-only key was replayed the full
key's dashboard link); the same key passed its scope check when its answer was kept. The same key with the same
request (method, path, query and body; a JSON body compared after parsing, a multipart body without its
boundary) replays the first answer with ``Idempotent-Replayed: true``: the replay never reaches the route, so
nothing is billed, rate-limited or created again. Another request with the key gets 422
``idempotency_key_reused``; the key while its first request is still running gets 409
``idempotency_key_in_use``; a malformed key 400 ``invalid_idempotency_key``.

Only a 2xx answer is kept: it is the one whose effect happened. Any other outcome (a refusal, an error, a
disconnect) releases the key, so the retry runs afresh: a refused request changed nothing, and a 429 must not be
replayed for a day. The store is the database (:mod:`modelmeter.tenancy.idempotency`), so replicas share it.

A kept answer is bounded (``MODELMETER_IDEMPOTENCY_MAX_ANSWER_BYTES``, 1 MiB): over it, the key is kept with a
short 409 ``idempotency_answer_not_kept`` in the answer's place, so a retry neither stores megabytes for a day
nor runs (and bills) the request again.

A kept answer's body is sealed (AES-GCM, a key derived from the admin token): a key creation or roll answers
with the new API key's secret, which must not rest in the database readable (keys are stored as hashes only).

Requests without the header, and every other method, pass straight through: no body is buffered and the
database is not touched. A caller that is not authenticated also passes through untouched (the route answers
its 401/403, and nothing is stored), as does Stripe's webhook (Stripe signs and retries its own events).
"""

from __future__ import annotations

import hashlib
import json
import logging

from cryptography.exceptions import InvalidTag
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelmeter import clock, sealing
from modelmeter.errors import (
    ConflictError,
    IdempotencyKeyInUseError,
    IdempotencyKeyReusedError,
    InvalidIdempotencyKeyError,
    RateLimitError,
    error_response,
)
from modelmeter.gateway.auth import admin_token_matches, parse_bearer
from modelmeter.gateway.deps import principal_of
from modelmeter.gateway.services import Services
from modelmeter.settings import Settings, ensure_admin_token
from modelmeter.tenancy import idempotency as store
from modelmeter.tenancy.idempotency import ADMIN_SCOPE, StoredResponse
from modelmeter.tenancy.keys import well_formed

log = logging.getLogger("modelmeter.idempotency")

HEADER = b"idempotency-key"
PARAM = "Idempotency-Key"
MAX_KEY_LENGTH = 255
_EXCLUDED_PREFIX = "/webhooks/"
# Not kept with an answer: framing (recomputed on replay), the server's own, and the rate-limit state of the
# first request's moment (a replay consumes nothing, so its "remaining" would mislead).
_NOT_KEPT = frozenset({
    "content-length", "transfer-encoding", "connection", "date", "server", "x-request-id", "retry-after",
    "ratelimit", "ratelimit-policy",
})
_NOT_KEPT_PREFIX = "x-ratelimit-"


class IdempotencyMiddleware:
    """Claim, replay or refuse a keyed POST (see the module docstring); runs inside the content-type check."""

    def __init__(self, app: ASGIApp, *, services: Services) -> None:
        self.app = app
        self.services = services
        self.sealer = Sealer(services.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].startswith(_EXCLUDED_PREFIX):
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope["headers"] if name == HEADER]
        caller = await self._caller(scope) if values else None
        if caller is None:
            await self.app(scope, receive, send)
            return
        key = valid_key(values)
        if key is None:
            await error_response(InvalidIdempotencyKeyError(
                f"'{PARAM}' must be 1 to {MAX_KEY_LENGTH} printable ASCII characters, sent once.", param=PARAM,
            ))(scope, receive, send)
            return
        body, failure = await _read_body(receive)
        if failure is not None:  # too large, or the client left: the app answers as it would without the key
            await self.app(scope, _failing(body, failure), send)
            return
        settings = self.services.settings
        claim = await run_in_threadpool(
            store.claim, sessions=self.services.sessions, scope=caller, key=key, fingerprint=fingerprint(scope, body),
            lock_s=settings.idempotency_lock_s, ttl_s=settings.idempotency_ttl_s,
        )
        if claim.outcome == "claimed":
            await self._run(scope, body, send, receive, caller=caller, key=key, claim_id=claim.claim_id)
        elif claim.outcome == "done":
            assert claim.response is not None
            try:
                answer = self.sealer.open(claim.response)
            except InvalidTag:  # sealed under another admin token: it cannot be replayed, and must not run again
                await error_response(ConflictError(
                    "The answer kept for this Idempotency-Key can no longer be read (the server's secret changed); "
                    "use a new key.", code="idempotency_key_unreadable", param=PARAM,
                ))(scope, receive, send)
                return
            self.services.telemetry.idempotent_replays.inc()
            await _replay(answer, send)
        elif claim.outcome == "in_flight":
            await error_response(IdempotencyKeyInUseError(
                "A request with this Idempotency-Key is still being processed; retry after it completes.",
                param=PARAM,
            ))(scope, receive, send)
        else:
            await error_response(IdempotencyKeyReusedError(
                "This Idempotency-Key was already used with a different request; use a new key for a new request.",
                param=PARAM,
            ))(scope, receive, send)

    async def _caller(self, scope: Scope) -> str | None:
        """The caller's scope, resolved as the authentication dependencies do; None when they would refuse it."""
        raw = dict(scope["headers"]).get(b"authorization")
        token = parse_bearer(raw.decode("latin-1") if raw is not None else None)
        if token is None:
            return None
        expected = self.services.settings.admin_token
        if expected and admin_token_matches(token, expected):
            return ADMIN_SCOPE
        hit, cached = self.services.auth.cached(token) if well_formed(token) else (False, None)
        if not (hit and cached is not None):
            client = scope.get("client")
            try:  # an address over its failed-authentication limit gets no lookup here either: the route says 429
                self.services.failed_auth.check(client[0] if client else "unknown")
            except RateLimitError:
                return None
        principal = cached if hit else await principal_of(self.services, token)
        if principal is None or not principal.admitted_at(clock.now_s()):
            return None
        return principal.key_id

    async def _run(self, scope: Scope, body: bytes, send: Send, receive: Receive, *, caller: str, key: str,
                   claim_id: str) -> None:
        """Let the claimed request through. Its answer is settled before the last byte leaves (a 2xx kept, any
        other released), so that a retry sent as soon as the answer arrives finds the key settled."""
        sessions = self.services.sessions
        settled = False
        status = 0
        headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []

        async def release() -> None:
            try:
                await run_in_threadpool(store.release, sessions=sessions, scope=caller, key=key, claim_id=claim_id)
            except Exception:  # the lease frees the key; the answer still goes out
                log.exception("releasing an idempotency key failed; it frees itself when its lease ends")

        async def capture(message: Message) -> None:
            nonlocal status, settled
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.extend((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
                               if _kept_header(k.decode("latin-1").lower()))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    settled = True
                    ok = 200 <= status < 300
                    answer = self.sealer.seal(self._bounded(StoredResponse(status, headers, b"".join(chunks)),
                                                            scope)) if ok else None
                    if not (answer is not None and await _complete(sessions, caller, key, claim_id, answer)):
                        await release()
            await send(message)

        try:
            await self.app(scope, _replaying(body, receive), capture)
        finally:
            if not settled:  # no complete answer: an exception, or the client left
                await release()


    def _bounded(self, answer: StoredResponse, scope: Scope) -> StoredResponse:
        """The answer to keep: itself, or past the size cap a 409 saying it was served and is not kept."""
        limit = self.services.settings.idempotency_max_answer_bytes
        if len(answer.body) <= limit:
            return answer
        request_id = scope.get("state", {}).get("request_id", "")
        error = ConflictError(
            f"The request with this Idempotency-Key was served (request id {request_id}), but its answer of "
            f"{len(answer.body)} bytes is over the {limit}-byte limit for kept answers: it is not replayed, and "
            "the request is not run again. Use a new key to run it again.",
            code="idempotency_answer_not_kept", param=PARAM)
        return StoredResponse(409, [("content-type", "application/json")], json.dumps(error.body()).encode())


_SEAL_CONTEXT = b"modelmeter/idempotency-answers/v1"


class Sealer:
    """Seal and open kept answers' bodies (``modelmeter.sealing``), bound to the status so that a sealed body
    cannot be replayed under another one."""

    def __init__(self, settings: Settings) -> None:
        token, _ = ensure_admin_token(settings)
        self._sealer = sealing.Sealer(token, _SEAL_CONTEXT)

    def seal(self, response: StoredResponse) -> StoredResponse:
        sealed = self._sealer.seal(response.body, str(response.status).encode())
        return StoredResponse(response.status, response.headers, sealed)

    def open(self, response: StoredResponse) -> StoredResponse:
        """Raises ``InvalidTag`` when the body was not sealed by this key (or was altered)."""
        body = self._sealer.open(response.body, str(response.status).encode())
        return StoredResponse(response.status, response.headers, body)


def valid_key(values: list[bytes]) -> str | None:
    """The key when exactly one header carries 1 to 255 printable ASCII characters (inner spaces included;
    tab, other control characters and non-ASCII bytes not); None otherwise."""
    if len(values) != 1:
        return None
    value = values[0].strip(b" ")  # as an HTTP server strips a field's surrounding whitespace
    if not 1 <= len(value) <= MAX_KEY_LENGTH or any(byte < 0x20 or byte > 0x7E for byte in value):
        return None
    return value.decode("ascii")


def fingerprint(scope: Scope, body: bytes) -> str:
    """SHA-256 of method, path, query string and the body in a canonical form (see ``_canonical``)."""
    digest = hashlib.sha256()
    for part in (scope["method"].encode(), scope["path"].encode(), scope.get("query_string", b""),
                 _canonical(scope, body)):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _canonical(scope: Scope, body: bytes) -> bytes:
    """A JSON body re-serialised with sorted keys (whitespace and key order are not the request); a multipart
    body without its boundary (clients draw a new one for each attempt); anything else as sent."""
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() == "multipart/form-data":
        boundary = _boundary(params)
        return body.replace(boundary.encode("latin-1"), b"") if boundary else body
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return body
    return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _boundary(params: str) -> str | None:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"') or None
    return None


def _kept_header(name: str) -> bool:
    return name not in _NOT_KEPT and not name.startswith(_NOT_KEPT_PREFIX)


async def _read_body(receive: Receive) -> tuple[bytes, BaseException | Message | None]:
    """The whole body, or what arrived of it with what stopped it (the size limit's error, a disconnect)."""
    chunks: list[bytes] = []
    while True:
        try:
            message = await receive()
        except Exception as error:  # handed to the app, which answers it as it would without the key
            return b"".join(chunks), error
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message, then the client's own channel (for the disconnect)."""
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return wrapped


def _failing(body: bytes, failure: BaseException | Message) -> Receive:
    """What arrived of the body, then the error or the disconnect that ended it."""
    delivered = False

    async def wrapped() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": True}
        if isinstance(failure, BaseException):
            raise failure
        return failure

    return wrapped


async def _complete(sessions: store.Sessions, caller: str, key: str, claim_id: str, response: StoredResponse) -> bool:
    """Keep the answer; a failure to keep it is logged (the caller releases the key) and never fails the answer."""
    try:
        return await run_in_threadpool(store.complete, sessions=sessions, scope=caller, key=key, claim_id=claim_id,
                                       response=response)
    except Exception:
        log.exception("keeping an idempotent answer failed; the key is released")
        return False


async def _replay(response: StoredResponse, send: Send) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    headers += [(b"content-length", str(len(response.body)).encode()), (b"idempotent-replayed", b"true")]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})

