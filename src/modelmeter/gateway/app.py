"""``create_app(settings)``: the gateway, with a lifespan that starts and stops its background parts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from modelmeter import db
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.limits import make_limiters
from modelmeter.billing.metering import LedgerWriter, Meter
from modelmeter.errors import install_handlers
from modelmeter.gateway.auth import KeyAuthenticator
from modelmeter.gateway.middleware import BodyLimitMiddleware, RequestContextMiddleware
from modelmeter.gateway.routes import admin, billing, files, fine_tuning, health, inference, usage
from modelmeter.gateway.services import Services
from modelmeter.models.backends import configure_torch_threads, resolve_device
from modelmeter.models.registry import ModelCache, register_platform_models
from modelmeter.models.serving import BatchCaps, ModelServer
from modelmeter.settings import Settings, ensure_admin_token, get_settings
from modelmeter.worker import spawn_worker, stop_worker

log = logging.getLogger("modelmeter.gateway")


def build_services(settings: Settings) -> Services:
    """Connect to the database and build the request-independent parts (no I/O beyond the engine)."""
    ensure_admin_token(settings)
    configure_torch_threads(settings.torch_threads)
    engine = db.engine_from_settings(settings)
    sessions = db.session_maker(engine)
    ledger = LedgerWriter(sessions)
    rate, quota = make_limiters(settings.redis_url)
    return Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        auth=KeyAuthenticator(sessions, ttl_s=settings.key_cache_ttl_s),
        plans=PlanCatalog.load(settings.plans_file),
        models=ModelCache(sessions),
        server=ModelServer(
            device=resolve_device(settings.device),
            memory_budget_bytes=settings.pool_memory_mb * 1024 * 1024,
            caps=BatchCaps(settings.max_batch_tokens, settings.max_batch_size, settings.max_wait_ms,
                           settings.max_queue_requests),
        ),
        ledger=ledger,
        rate=rate,
        quota=quota,
        meter=Meter(sessions=sessions, ledger=ledger, quota=quota),
    )


def prepare_database(services: Services) -> None:
    """Apply migrations and register platform models (idempotent)."""
    db.upgrade(services.engine)
    with db.session_scope(services.sessions) as session:
        register_platform_models(session=session)


async def _flush_loop(services: Services) -> None:
    while True:
        await asyncio.sleep(services.settings.last_used_flush_s)
        try:
            await run_in_threadpool(services.auth.flush_last_used)
        except Exception:
            log.exception("flushing last_used_at failed; will retry")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    services: Services = app.state.services
    await run_in_threadpool(prepare_database, services)
    flusher = asyncio.create_task(_flush_loop(services))
    services.ledger.start()
    worker = spawn_worker(services.settings) if services.settings.start_worker else None
    try:
        yield
    finally:
        if worker is not None:
            await run_in_threadpool(stop_worker, worker)
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await services.server.close()
        await services.ledger.close()
        await services.rate.aclose()
        await services.quota.aclose()
        await run_in_threadpool(services.auth.flush_last_used)
        services.engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app for ``settings`` (the environment's when omitted)."""
    settings = settings or get_settings()
    app = FastAPI(title="modelmeter", version="0.1.0", lifespan=lifespan)
    app.state.services = build_services(settings)
    install_handlers(app)
    routers = (health, admin, inference, files, fine_tuning, usage, billing)
    for router in (module.router for module in routers):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, limit_for=_limits(settings))
    app.add_middleware(RequestContextMiddleware)
    return app


def _limits(settings: Settings) -> Callable[[str], int]:
    def limit_for(path: str) -> int:
        return settings.max_file_bytes if path == "/v1/files" else settings.max_body_bytes

    return limit_for

