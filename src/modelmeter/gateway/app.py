"""``create_app(settings)``: the gateway (a front), with a lifespan that runs what ``wiring`` builds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from modelmeter.errors import install_handlers
from modelmeter.gateway import openapi
from modelmeter.gateway.fastlane import FastLane
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
    batches,
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
from modelmeter.gateway.wiring import build_services, running
from modelmeter.settings import Settings, get_settings

__all__ = ["build_services", "create_app"]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with running(app.state.services, app=app):
        yield


def create_app(settings: Settings | None = None, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """The gateway app for ``settings`` (the environment's when omitted); metrics on ``registry`` if given."""
    settings = settings or get_settings()
    # No /docs or /redoc: FastAPI's pages load unpinned scripts from a CDN into the gateway's origin (issue 21).
    # The contract is /openapi.json, for any OpenAPI viewer run locally.
    app = FastAPI(title="modelmeter", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.services = build_services(settings, registry=registry)
    install_handlers(app)
    # Routes match in order: the inference routes, the hot path, go first (each route tried costs a regex match).
    routers = (inference, health, metrics, admin, files, fine_tuning, batches, usage, billing, events, dashboard,
               webhooks)
    for router in (module.router for module in routers):
        app.include_router(router)
    app.include_router(events.admin_router)
    # Documented, not served: the body the alert relay POSTs to a tenant's URL (OpenAPI 3.1 ``webhooks``).
    app.webhooks.post("usage.threshold_crossed", tags=["events"])(events.usage_threshold_crossed)
    app.webhooks.post("batch.completed", tags=["events"])(events.batch_completed)
    app.webhooks.post("batch.failed", tags=["events"])(events.batch_failed)
    openapi.install(app, plan_ids=(p.id for p in app.state.services.plans.all()),
                    max_inputs=settings.max_inputs_per_request)
    app.add_middleware(IdempotencyMiddleware, services=app.state.services)  # inside: sees the body as routes do
    app.add_middleware(ContentTypeMiddleware, expects=_media_types)
    app.add_middleware(BodyLimitMiddleware, limit_for=_limits(settings))
    if settings.fast_lane:  # inside the request context (ids, access log, metrics), before everything else
        app.add_middleware(FastLane, router=inference.router, services=app.state.services)
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

