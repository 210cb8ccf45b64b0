"""The serving pipeline behind every inference route (HTTP-aware glue between auth, models and billing)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from modelmeter import clock
from modelmeter.billing.ledger import UsageRecord
from modelmeter.billing.meter import Hold
from modelmeter.billing.quota import Amount
from modelmeter.errors import (
    ClientDisconnectedError,
    InsufficientQuotaError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RateLimitError,
    ServiceUnavailableError,
)
from modelmeter.gateway.auth import Principal
from modelmeter.gateway.ratelimit import RateDecision
from modelmeter.gateway.ratelimit_headers import rate_headers
from modelmeter.gateway.services import Services
from modelmeter.models.batching import BatcherClosed, QueueFull, Submission
from modelmeter.models.engine.client import EngineError, EngineUnavailable
from modelmeter.models.outputs import Result
from modelmeter.models.pool import ModelLoadError
from modelmeter.models.registry import ModelInfo, artifact_path
from modelmeter.models.source import ModelSource
from modelmeter.models.text import Encoded, InputTooLong, TextEncoder, TooManyCharacters

# Tokenizing this many characters takes long enough to be worth a thread hop off the event loop.
_INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Served:
    """What a request got: one result per input, its billable tokens, and where its time went."""

    model_id: str
    task: str
    results: list[Result]
    tokens: int
    queue_s: float
    inference_s: float
    headers: dict[str, str]
    encoded: Encoded | None = None  # with ``spans``: the inputs' tokens and their offsets
    unk_id: int | None = None  # the tokenizer's unknown token (a tagger's word boundaries need it)


async def serve(
    request: Request,
    principal: Principal,
    model_id: str,
    texts: list[str],
    *,
    truncate: bool,
    endpoint: str,
    check: Callable[[ModelInfo], None] | None = None,
    dimensions: int | None = None,
    spans: bool | Callable[[ModelInfo], bool] = False,
) -> Served:
    """Run ``texts`` through the tenant's model and commit the usage row before returning."""
    services: Services = request.app.state.services
    limit = services.settings.max_inputs_per_request
    if len(texts) > limit:
        raise InvalidRequestError(f"At most {limit} inputs per request.", code="too_many_inputs", param="input")
    info = await services.models.get(principal.tenant_id, model_id)
    request.state.model_id = info.id  # a registered model: safe as a metric label
    if check is not None:
        check(info)
    source = await _source(services, principal, info)
    encoder = await _encoder(services, source)
    _check_dimensions(encoder, dimensions)
    # A large request takes its place in RPM before the tokenizer reads it: refused, it costs one limiter round
    # trip, not the tokenizer (issue 21: 1 MiB took ~0.8 s of CPU to refuse). Small ones take RPM and TPM in one.
    counted = sum(len(t) for t in texts) > _INLINE_TOKENIZE_CHARS
    if counted:
        await _take_request(services, principal)
    encoded = await _tokenize(encoder, texts, truncate, spans(info) if callable(spans) else spans)
    now = clock.now_s()
    headers, hold = await _admit(services, principal, encoded.total_tokens, now, request.state.request_id,
                                 requests=0 if counted else 1)
    try:
        submission = await _submit(request, services, source, encoded.ids, priority=1 if principal.batch else 0)
    except BaseException:
        await asyncio.shield(services.meter.release(hold))  # not served: not billed
        raise
    record = _record(request, principal, info, encoded, submission, endpoint, services.engines.device_for(source), now)
    await services.meter.commit(hold, record)
    services.telemetry.observe_served(info.id, queue_s=submission.queue_s, inference_s=submission.inference_s)
    return Served(info.id, info.task, submission.results, encoded.total_tokens, submission.queue_s,
                  submission.inference_s, headers, encoded, encoder.unk_id)


async def _encoder(services: Services, source: ModelSource) -> TextEncoder:
    """The model's tokenizer, on the front (an adapter uses its base's); the first use reads its files."""
    path = (source.base or source).path
    found = services.encoders.peek(path)
    if found is not None:
        return found
    try:
        return await run_in_threadpool(services.encoders.get, path)
    except (OSError, ValueError) as exc:
        raise ServiceUnavailableError(
            f"The model '{source.model_id}' cannot be served: its tokenizer could not be read.",
            code="model_unavailable") from exc


async def _source(services: Services, principal: Principal, info: ModelInfo) -> ModelSource:
    """Where the model's files are; a LoRA adapter also names the platform base it runs on (from the registry,
    never from the request)."""
    data_dir = services.settings.data_dir
    source = _model_source(info.id, info.artifact, info.task, data_dir)
    if not info.is_adapter:
        return source
    try:
        base = await services.models.get(principal.tenant_id, info.base_model)
    except NotFoundError as exc:
        raise ServiceUnavailableError(
            f"The model '{info.id}' cannot be served: its base model '{info.base_model}' is not available.",
            code="model_unavailable") from exc
    base_source = _model_source(base.id, base.artifact, base.task, data_dir)
    return _with_base(source, base_source)


# Resolving an artifact reference costs ~12 us (a package lookup) and the same few models serve every request.
@functools.lru_cache(maxsize=4096)
def _model_source(model_id: str, artifact: str, task: str, data_dir: Path) -> ModelSource:
    return ModelSource(model_id, artifact_path(artifact, data_dir), task)


@functools.lru_cache(maxsize=4096)
def _with_base(source: ModelSource, base: ModelSource) -> ModelSource:
    return replace(source, base=base)


async def _take_request(services: Services, principal: Principal) -> None:
    """Count the request in RPM alone (its tokens are counted once known); 429 when RPM is spent."""
    if principal.batch:  # batch lines are paced by the runner, not by the interactive limits
        return
    plan = services.plans.get(principal.plan)
    decision = await services.rate.check(
        principal.tenant_id, rpm=principal.rpm_limit or plan.rpm_limit, tpm=principal.tpm_limit or plan.tpm_limit,
        tokens=0,
    )
    if not decision.allowed:
        services.telemetry.rate_limited(principal.tenant_id, decision.reason)
        raise _rate_error(decision, rate_headers(decision), 0)


async def _admit(services: Services, principal: Principal, tokens: int, now: int,
                 request_id: str, *, requests: int = 1) -> tuple[dict[str, str], Hold]:
    """Rate limits (RPM and TPM; not for a batch line), then quota and budget: the request's cost is known before
    compute."""
    plan = services.plans.get(principal.plan)
    headers: dict[str, str] = {}
    decision = None if principal.batch else await services.rate.check(
        principal.tenant_id, rpm=principal.rpm_limit or plan.rpm_limit, tpm=principal.tpm_limit or plan.tpm_limit,
        tokens=tokens, requests=requests,
    )
    if decision is not None:
        headers = rate_headers(decision)
    if decision is not None and not decision.allowed:
        services.telemetry.rate_limited(principal.tenant_id, decision.reason)
        raise _rate_error(decision, headers, tokens)
    try:
        hold = await services.meter.reserve(tenant_id=principal.tenant_id, plan=plan,
                                            budget_cents=principal.monthly_budget_cents,
                                            amount=_amount(principal, tokens), at=now,
                                            credits_epoch=principal.credits_epoch, request_id=request_id)
    except InsufficientQuotaError as exc:
        services.telemetry.quota_refused(principal.tenant_id)
        exc.headers.update(headers)
        raise
    return headers, hold


def _amount(principal: Principal, tokens: int) -> Amount:
    """What a request holds: one request and its tokens, counted as batch usage too for a batch line (priced at
    the plan's batch discount, under the same caps)."""
    if principal.batch:
        return Amount(requests=1, tokens=tokens, batch_requests=1, batch_tokens=tokens)
    return Amount(requests=1, tokens=tokens)


def _rate_error(decision: RateDecision, headers: dict[str, str], tokens: int) -> RateLimitError:
    if decision.reason == "too_large":
        return RateLimitError(
            f"This request has {tokens} tokens, more than your limit of {decision.limit_tokens} tokens per minute; "
            "split it into smaller requests.", code="tokens_exceed_tpm_limit", headers=headers)
    what = "requests" if decision.reason == "requests" else "tokens"
    return RateLimitError(
        f"Rate limit reached for {what} per minute; retry after {headers.get('Retry-After', '1')} s.",
        headers=headers)


def _check_dimensions(encoder: TextEncoder, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != encoder.dimensions:
        raise InvalidRequestError(
            f"This model returns {encoder.dimensions}-dimensional embeddings; 'dimensions' cannot change that.",
            code="unsupported_dimensions",
            param="dimensions",
        )


async def _tokenize(encoder: TextEncoder, texts: list[str], truncate: bool, spans: bool = False) -> Encoded:
    try:
        if sum(len(t) for t in texts) <= _INLINE_TOKENIZE_CHARS:
            return encoder.tokenize(texts, truncate=truncate, spans=spans)
        return await run_in_threadpool(encoder.tokenize, texts, truncate=truncate, spans=spans)
    except InputTooLong as exc:
        raise InvalidRequestError(
            f"Input {exc.index} has {exc.tokens} tokens; the model accepts at most {exc.max_length}. "
            "Shorten it or set \"truncate\": true.",
            code="context_length_exceeded",
            param="input",
        ) from exc
    except TooManyCharacters as exc:
        raise InvalidRequestError(
            f"Input {exc.index} has {exc.chars} characters; at most {exc.limit} are read for a model of "
            f"{encoder.max_length} tokens. Shorten it or set \"truncate\": true.",
            code="context_length_exceeded",
            param="input",
        ) from exc


async def _submit(request: Request, services: Services, source: ModelSource, ids: list[list[int]], *,
                  priority: int = 0) -> Submission[Result]:
    """Run the rows on the engine while watching the connection: a departed client's rows are dropped. A batch
    line's rows go at ``priority`` 1: the engine serves them behind interactive rows (0)."""
    work = asyncio.ensure_future(services.engines.submit(source, ids, priority=priority))
    watch = asyncio.ensure_future(_disconnected(request))
    # The watch cancels the work when the client leaves (a done callback: asyncio.wait's waiter and callbacks on
    # both tasks cost ~20 us a request in bench/fronts.py's profile).
    watch.add_done_callback(lambda _: work.cancel())
    try:
        with contextlib.suppress(Exception):  # the work's own error: work.result() raises it below
            await asyncio.shield(work)  # shielded: a cancelled request is told apart from a departed client
    except asyncio.CancelledError:
        if not work.cancelled():
            raise  # this request itself was cancelled (server shutdown): the finally lets go of the rows
    finally:
        watch.cancel()
        if not work.done():
            # Leave only once the engine has let go of the rows (an adapter's pages may be reused once it does).
            work.cancel()
            await asyncio.shield(asyncio.gather(work, return_exceptions=True))
    if work.cancelled():
        raise ClientDisconnectedError("The client disconnected before its inputs were computed.")
    try:
        return work.result()
    except QueueFull as exc:
        services.telemetry.overloaded(request.state.model_id)
        raise OverloadedError(
            "The model's queue is full; retry shortly.", headers={"Retry-After": "1"}
        ) from exc
    except ModelLoadError as exc:
        raise ServiceUnavailableError(
            f"The model '{source.model_id}' could not be loaded: {exc.reason}. Retry later.", code="model_unavailable"
        ) from exc
    except (EngineUnavailable, BatcherClosed) as exc:
        raise ServiceUnavailableError(
            "The inference engine is restarting; retry in a second.", code="engine_unavailable",
            headers={"Retry-After": "1"}) from exc
    except EngineError as exc:
        raise InternalError("The inference engine failed this request.", code="engine_error") from exc


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _record(
    request: Request, principal: Principal, info: ModelInfo, encoded: Encoded, submission: Submission[Any],
    endpoint: str, device: str, created: int,
) -> UsageRecord:
    return UsageRecord(
        request_id=request.state.request_id,
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        model_id=info.id,
        created=created,
        plan=principal.plan,
        kind="batch" if principal.batch else "inference",
        endpoint=endpoint,
        device=device,
        inputs=len(encoded.ids),
        tokens=encoded.total_tokens,
        queue_us=int(submission.queue_s * 1e6),
        compute_us=int(submission.compute_s * 1e6),
    )
