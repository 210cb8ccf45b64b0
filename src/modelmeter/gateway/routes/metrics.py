"""``GET /metrics``: the Prometheus exposition (a bearer token: the admin token or ``MODELMETER_METRICS_TOKEN``,
since it names every tenant with its revenue and margin), and the wiring of the
scrape-time database collectors (:mod:`modelmeter.gateway.collectors`) onto the app's
:class:`~modelmeter.telemetry.Telemetry`."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from modelmeter.billing.economics import compute_prices
from modelmeter.errors import AuthenticationError
from modelmeter.gateway.auth import admin_token_matches, parse_bearer
from modelmeter.gateway.collectors import DatabaseCollector
from modelmeter.gateway.deps import ServicesDep
from modelmeter.gateway.services import Services
from modelmeter.settings import Settings
from modelmeter.telemetry import Telemetry, multiprocess_dir_from_env
from modelmeter.tenancy.tenants import Tenant, all_tenants

router = APIRouter(tags=["metrics"])


def make_telemetry(settings: Settings, registry: CollectorRegistry | None = None) -> Telemetry:
    """The app's metrics on ``registry`` (a fresh one when omitted); multiprocess when the environment says so."""
    return Telemetry(registry, max_tenants=settings.metrics_max_tenants, max_models=settings.metrics_max_models,
                     multiprocess_dir=multiprocess_dir_from_env())


def instrument(services: Services) -> None:
    """Add the database gauges read at scrape time (the in-process engine's queues are watched by ``wiring``)."""
    settings = services.settings
    services.telemetry.add_scrape_collector(DatabaseCollector(
        sessions=services.sessions, catalog=services.plans, prices=compute_prices(settings), tenants=_tenants,
        max_tenants=settings.metrics_max_tenants, ttl_s=settings.metrics_db_ttl_s,
    ))


def _tenants(session: Session) -> Sequence[Tenant]:
    return all_tenants(session=session)


def _reader(request: Request, services: Services) -> None:
    """The admin token or the metrics token passes; anything else (a tenant key too) is 401."""
    token = parse_bearer(request.headers.get("authorization"))
    if token is None:
        raise AuthenticationError("GET /metrics needs 'Authorization: Bearer <admin or metrics token>'.",
                                  code="missing_api_key")
    settings = services.settings
    if not any(expected and admin_token_matches(token, expected)
               for expected in (settings.admin_token, settings.metrics_token)):
        raise AuthenticationError("This token cannot read the metrics.", code="invalid_api_key")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, services: ServicesDep) -> Response:
    """Every metric in the Prometheus text format (aggregated over worker processes in multiprocess mode)."""
    _reader(request, services)
    services.telemetry.refresh_live()
    body = await run_in_threadpool(services.telemetry.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
