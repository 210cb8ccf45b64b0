"""``create_app(settings)``: the gateway, with a lifespan that starts and stops its background parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from modelmeter import db
from modelmeter.billing.alert_relay import AlertRelay
from modelmeter.billing.alerts import Alerts
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.credits import store_grants
from modelmeter.billing.metering import LedgerWriter, Meter
from modelmeter.billing.stripe.relay import StripeRelay, relay_from_settings
from modelmeter.errors import install_handlers
from modelmeter.gateway import openapi
from modelmeter.gateway.auth import KeyAuthenticator
from modelmeter.gateway.idempotency import IdempotencyMiddleware
from modelmeter.gateway.middleware import (
    JSON,
    MULTIPART,
    BodyLimitMiddleware,
    ContentTypeMiddleware,
    RequestContextMiddleware,
)
from modelmeter.gateway.routes import (
    admin,
    billing,
    dashboard,
    events,
    files,
    fine_tuning,
    health,
    inference,
    metrics,
    usage,
    webhooks,
)
from modelmeter.gateway.services import Services, make_limiters
from modelmeter.models.backends import configure_torch_threads, resolve_device
from modelmeter.models.registry import ModelCache, register_platform_models
from modelmeter.models.serving import AdapterConfig, AdapterHooks, BatchCaps, ModelServer
from modelmeter.settings import Settings, ensure_admin_token, get_settings
from modelmeter.telemetry import Telemetry
from modelmeter.tenancy import idempotency
from modelmeter.trainer import spawn_worker, stop_worker

log = logging.getLogger("modelmeter.gateway")
MIB = 1024 * 1024
DEFAULT_ADAPTER_DEVICE_MB = 1024


def build_services(settings: Settings, *, registry: CollectorRegistry | None = None) -> Services:
    """Connect to the database and build the request-independent parts (no I/O beyond the engine).

    ``registry``: where the metrics are created (tests inject one); a fresh registry per app when omitted.
    """
    ensure_admin_token(settings)
    configure_torch_threads(settings.torch_threads)
    engine = db.engine_from_settings(settings)
    sessions = db.session_maker(engine)
    telemetry = metrics.make_telemetry(settings, registry)
    plans = PlanCatalog.load(settings.plans_file)
    alert_hook = Alerts(plans)
    ledger = LedgerWriter(sessions, on_commit=telemetry.on_commit, alerts=alert_hook)
    rate, quota = make_limiters(settings.redis_url)
    services = Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        auth=KeyAuthenticator(sessions, ttl_s=settings.key_cache_ttl_s),
        plans=plans,
        models=ModelCache(sessions),
        server=_model_server(settings, telemetry),
        ledger=ledger,
        rate=rate,
        quota=quota,
        meter=Meter(sessions=sessions, ledger=ledger, quota=quota,
                    grants=lambda tenant_id, now: store_grants(sessions=sessions, tenant_id=tenant_id, now=now)),
        telemetry=telemetry,
        alert_hook=alert_hook,
    )
    metrics.instrument(services)
    services.stripe = _stripe_relay(services)
    if settings.alerts_relay_interval_s > 0:
        services.alerts = AlertRelay(sessions=sessions, max_attempts=settings.alerts_max_attempts,
                                     timeout_s=settings.alerts_timeout_s,
                                     backoff_base_s=settings.alerts_backoff_base_s,
                                     allow_private=settings.alerts_allow_private_urls)
    return services


def _model_server(settings: Settings, telemetry: Telemetry) -> ModelServer:
    device = resolve_device(settings.device)
    device_mb = settings.adapter_device_mb
    if device_mb is None:  # auto: two tiers on CUDA (device pages backed by host memory), one on the CPU
        device_mb = DEFAULT_ADAPTER_DEVICE_MB if device.type == "cuda" else 0
    adapters = AdapterConfig(budget_bytes=settings.adapter_pool_mb * MIB,
                             device_bytes=device_mb * MIB if device_mb else None, max_labels=settings.max_labels)
    return ModelServer(
        device=device,
        memory_budget_bytes=settings.pool_memory_mb * MIB,
        caps=BatchCaps(settings.max_batch_tokens, settings.max_batch_size, settings.max_wait_ms,
                       settings.max_queue_requests, settings.max_padding_ratio),
        adapters=adapters,
        on_batch=telemetry.batch_hook, on_load=telemetry.on_load, on_evict=telemetry.on_evict,
        adapter_hooks=AdapterHooks(on_load=telemetry.on_adapter_load, on_evict=telemetry.on_adapter_evict,
                                   on_batch=telemetry.adapter_batch_hook),
    )


def _stripe_relay(services: Services) -> StripeRelay | None:
    """The Stripe outbox relay when a key is set (refuses a live key unless live mode is on)."""

    def invalidate(tenant_id: str) -> None:
        services.auth.invalidate(lambda p: p.tenant_id == tenant_id)

    return relay_from_settings(services.settings, sessions=services.sessions, catalog=services.plans,
                               on_suspend=invalidate)


def prepare_database(services: Services) -> None:
    """Apply migrations and register platform models (idempotent)."""
    db.upgrade(services.engine)
    with db.session_scope(services.sessions) as session:
        register_platform_models(session=session)


async def _pause(stop: asyncio.Event, seconds: float) -> bool:  # float-ok: seconds
    """Sleep ``seconds`` unless ``stop`` is set first; True when the loop should end."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# The loops below end at ``stop`` rather than being cancelled: a cancelled task does not stop the worker thread it
# awaits, and a thread still holding a pooled connection when the engine is disposed leaks that connection.
async def _housekeeping_loop(services: Services, stop: asyncio.Event) -> None:
    """Every ``last_used_flush_s``: write the buffered ``last_used_at`` values, forget expired idempotency keys."""
    while not await _pause(stop, services.settings.last_used_flush_s):
        try:
            await run_in_threadpool(services.auth.flush_last_used)
        except Exception:
            log.exception("flushing last_used_at failed; will retry")
        try:
            await run_in_threadpool(idempotency.purge, sessions=services.sessions)
        except Exception:
            log.exception("purging expired idempotency keys failed; will retry")


async def _alert_tenants_loop(services: Services, stop: asyncio.Event) -> None:
    """Keep the ledger's set of tenants with alerts fresh (tenants outside it cost the ledger no query)."""
    hook = services.alert_hook
    assert hook is not None
    while True:
        try:
            await run_in_threadpool(hook.refresh, services.engine)
        except Exception:
            log.exception("refreshing the tenants with alerts failed; will retry")
        if await _pause(stop, services.settings.alerts_refresh_s):
            return


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    services: Services = app.state.services
    await run_in_threadpool(prepare_database, services)
    stop = asyncio.Event()
    flusher = asyncio.create_task(_housekeeping_loop(services, stop))
    refresher = (asyncio.create_task(_alert_tenants_loop(services, stop)) if services.alert_hook is not None
                 else None)
    services.ledger.start()
    if services.stripe is not None:
        services.stripe.start(services.settings.stripe_sync_interval_s)
    if services.alerts is not None:
        services.alerts.start(services.settings.alerts_relay_interval_s)
    worker = spawn_worker(services.settings) if services.settings.start_worker else None
    try:
        yield
    finally:
        if worker is not None:
            await run_in_threadpool(stop_worker, worker)
        stop.set()
        await asyncio.gather(*(task for task in (flusher, refresher) if task is not None), return_exceptions=True)
        await services.meter.aclose()
        await services.server.close()
        await services.ledger.close()
        await services.rate.aclose()
        await services.quota.aclose()
        await run_in_threadpool(services.auth.flush_last_used)
        if services.stripe is not None:
            await services.stripe.aclose()
        if services.alerts is not None:
            await services.alerts.aclose()
        services.telemetry.close()
        services.engine.dispose()


def create_app(settings: Settings | None = None, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """The gateway app for ``settings`` (the environment's when omitted); metrics on ``registry`` if given."""
    settings = settings or get_settings()
    app = FastAPI(title="modelmeter", version="0.1.0", lifespan=lifespan)
    app.state.services = build_services(settings, registry=registry)
    install_handlers(app)
    routers = (health, metrics, admin, inference, files, fine_tuning, usage, billing, events, dashboard, webhooks)
    for router in (module.router for module in routers):
        app.include_router(router)
    app.include_router(events.admin_router)
    openapi.install(app, plan_ids=(p.id for p in app.state.services.plans.all()),
                    max_inputs=settings.max_inputs_per_request)
    app.add_middleware(IdempotencyMiddleware, services=app.state.services)  # inside: sees the body as routes do
    app.add_middleware(ContentTypeMiddleware, expects=_media_types)
    app.add_middleware(BodyLimitMiddleware, limit_for=_limits(settings))
    app.add_middleware(RequestContextMiddleware)
    return app


def _media_types(method: str, path: str) -> str | None:
    """The body each route reads: a file upload is multipart, Stripe's webhook is raw bytes, the rest JSON."""
    if path == "/v1/files":
        return MULTIPART
    if path.startswith("/webhooks/"):
        return None
    return JSON


def _limits(settings: Settings) -> Callable[[str], int]:
    def limit_for(path: str) -> int:
        return settings.max_file_bytes if path == "/v1/files" else settings.max_body_bytes

    return limit_for

