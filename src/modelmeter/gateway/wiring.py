"""The composition root: everything a front runs, built in one place and shut down in reverse.

``build_services(settings)`` makes the request-independent parts (no I/O beyond creating the database engine);
``running(services)`` starts them in order on an :class:`~contextlib.AsyncExitStack` (the database prepared, the
engine client connected, the ledger writer, the relays and every background :class:`~modelmeter.periodic.Periodic`,
the fine-tuning worker) and the stack stops them in the reverse order. The engine is in-process unless ``serve``
gave this front the engines' sockets (``MODELMETER_ENGINE_SOCKETS``): then this process loads no torch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp

from modelmeter import db
from modelmeter.billing.alert_relay import AlertRelay
from modelmeter.billing.alerts import Alerts, seal_plain_secrets, secret_sealer
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.credits import store_grants
from modelmeter.billing.ledger import LedgerWriter
from modelmeter.billing.meter import Meter
from modelmeter.billing.stripe.relay import StripeRelay, relay_from_settings
from modelmeter.gateway.auth import FailedAuthThrottle, KeyAuthenticator
from modelmeter.gateway.batch_runner import BatchRunner
from modelmeter.gateway.invalidation import Invalidations
from modelmeter.gateway.routes import metrics
from modelmeter.gateway.services import Services, make_limiters
from modelmeter.models.engine.client import EngineClient, RemoteEngine
from modelmeter.models.registry import ModelCache, register_platform_models
from modelmeter.periodic import Periodic
from modelmeter.runtime.worker import spawn_worker, stop_worker
from modelmeter.settings import Settings, ensure_admin_token, private_data_dir
from modelmeter.telemetry import Telemetry
from modelmeter.tenancy import idempotency

log = logging.getLogger("modelmeter.gateway")


def build_services(settings: Settings, *, registry: CollectorRegistry | None = None) -> Services:
    """Connect to the database and build the request-independent parts (no I/O beyond the engine).

    ``registry``: where the metrics are created (tests inject one); a fresh registry per app when omitted.
    """
    private_data_dir(settings)
    ensure_admin_token(settings)
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
        engines=_engines(settings, telemetry),
        ledger=ledger,
        rate=rate,
        quota=quota,
        meter=Meter(sessions=sessions, ledger=ledger, quota=quota,
                    grants=lambda tenant_id, now: store_grants(sessions=sessions, tenant_id=tenant_id, now=now)),
        telemetry=telemetry,
        alert_hook=alert_hook,
        failed_auth=FailedAuthThrottle(per_minute=settings.auth_failures_per_minute),
    )
    services.invalidations = Invalidations(services.auth, settings.redis_url)
    metrics.instrument(services)
    services.stripe = _stripe_relay(services)
    if settings.alerts_relay_interval_s > 0:
        services.alerts = AlertRelay(sessions=sessions, max_attempts=settings.alerts_max_attempts,
                                     timeout_s=settings.alerts_timeout_s,
                                     backoff_base_s=settings.alerts_backoff_base_s,
                                     allow_private=settings.alerts_allow_private_urls,
                                     sealer=secret_sealer(ensure_admin_token(settings)[0]))
    return services


def _engines(settings: Settings, telemetry: Telemetry) -> EngineClient:
    """The engine processes' client when ``serve`` started them; else the model server in this process."""
    if settings.engine_sockets:
        return RemoteEngine([Path(path) for path in settings.engine_sockets.split(",") if path])
    # Only the in-process engine imports torch: a front of `serve --workers N` never reaches these imports.
    from modelmeter.models.engine.local import LocalEngine
    from modelmeter.runtime.engine import build_engine

    server, counters = build_engine(settings, settings.device, telemetry)
    return LocalEngine(server, counters)


def _stripe_relay(services: Services) -> StripeRelay | None:
    """The Stripe outbox relay when a key is set (refuses a live key unless live mode is on)."""

    return relay_from_settings(services.settings, sessions=services.sessions, catalog=services.plans,
                               on_suspend=services.forget_tenant)


def prepare_database(services: Services) -> None:
    """Apply migrations and register platform models (idempotent)."""
    db.upgrade(services.engine)
    with db.session_scope(services.sessions) as session:
        register_platform_models(session=session)
    with services.sessions() as session:  # secrets stored before they were sealed (round 2's)
        seal_plain_secrets(session=session, sealer=secret_sealer(ensure_admin_token(services.settings)[0]))


def _housekeeping(services: Services) -> None:
    """Write the buffered ``last_used_at`` values, forget expired idempotency keys."""
    try:
        services.auth.flush_last_used()
    finally:
        idempotency.purge(sessions=services.sessions)


@asynccontextmanager
async def running(services: Services, *, app: ASGIApp | None = None) -> AsyncIterator[None]:
    """Start everything ``services`` runs, in order; stop it in reverse when the block ends. With ``app``, the
    batch runner too (it serves batch lines through the app)."""
    settings = services.settings
    async with AsyncExitStack() as stack:
        await run_in_threadpool(prepare_database, services)
        stack.callback(services.engine.dispose)
        stack.callback(services.telemetry.close)
        stack.push_async_callback(run_in_threadpool, services.auth.flush_last_used)
        stack.push_async_callback(services.quota.aclose)
        stack.push_async_callback(services.rate.aclose)
        services.ledger.start()
        stack.push_async_callback(services.ledger.close)
        if services.invalidations is not None:
            await services.invalidations.start()
            stack.push_async_callback(services.invalidations.aclose)
        await services.engines.start()
        stack.push_async_callback(services.engines.aclose)
        stack.push_async_callback(services.meter.aclose)
        if services.stripe is not None:
            services.stripe.start(settings.stripe_sync_interval_s)
            stack.push_async_callback(services.stripe.aclose)
        if services.alerts is not None:
            services.alerts.start(settings.alerts_relay_interval_s)
            stack.push_async_callback(services.alerts.aclose)
        loops = [Periodic(lambda: _housekeeping(services), name="housekeeping")]
        loops[0].start(settings.last_used_flush_s)
        if services.alert_hook is not None:
            hook = services.alert_hook
            refresh = Periodic(lambda: hook.refresh(services.engine), name="alert tenants refresh", immediately=True)
            refresh.start(settings.alerts_refresh_s)
            loops.append(refresh)
        for loop in loops:
            stack.push_async_callback(loop.stop)
        if app is not None and settings.batch_interval_s > 0:
            runner = BatchRunner(app, services, lease_s=settings.batch_lease_s)
            runner.start(settings.batch_interval_s)
            services.batch_runner = runner
            stack.push_async_callback(runner.aclose)  # before the engines and the ledger close
        if settings.start_worker:
            worker = spawn_worker(settings)
            stack.push_async_callback(run_in_threadpool, stop_worker, worker)
        yield
