"""The running platform's parts, built once per app and reached through ``deps``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter.billing.alert_relay import AlertRelay
from modelmeter.billing.alerts import Alerts
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.ledger import LedgerWriter
from modelmeter.billing.meter import Meter
from modelmeter.billing.quota import InProcessQuotaStore, QuotaStore, RedisQuotaStore
from modelmeter.billing.stripe.relay import StripeRelay
from modelmeter.gateway.auth import FailedAuthThrottle, KeyAuthenticator
from modelmeter.gateway.invalidation import Invalidations
from modelmeter.gateway.ratelimit import InProcessRateLimiter, RateLimiter, RedisRateLimiter
from modelmeter.gateway.redis_clients import redis_client
from modelmeter.models.engine.client import EngineClient
from modelmeter.models.registry import ModelCache
from modelmeter.models.text import TextEncoders
from modelmeter.settings import Settings
from modelmeter.telemetry import Telemetry


class BatchRunning(Protocol):
    """What the app keeps of its batch runner (``gateway.batch_runner.BatchRunner``)."""

    owner: str

    async def run_once(self) -> bool: ...


@dataclass
class Services:
    """Everything a request may need; one instance per app, on ``app.state.services``."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    auth: KeyAuthenticator
    plans: PlanCatalog
    models: ModelCache
    engines: EngineClient  # in-process (LocalEngine) or the engine processes (RemoteEngine)
    ledger: LedgerWriter
    rate: RateLimiter
    quota: QuotaStore
    meter: Meter
    telemetry: Telemetry = field(default_factory=Telemetry)
    encoders: TextEncoders = field(default_factory=TextEncoders)
    stripe: StripeRelay | None = None  # set when a Stripe key is configured
    alert_hook: Alerts | None = None  # the ledger's alert hook (its set of tenants with alerts is refreshed)
    alerts: AlertRelay | None = None  # the usage alerts relay (None when alerts_relay_interval_s is 0)
    failed_auth: FailedAuthThrottle = field(default_factory=lambda: FailedAuthThrottle(per_minute=30))
    invalidations: Invalidations | None = None  # set by wiring (key caches forgotten on every replica)
    batch_runner: BatchRunning | None = None  # set by wiring when the app runs one (``batch_runner``)

    def forget_tenant(self, tenant_id: str) -> None:
        """Every replica's cached keys of ``tenant_id`` (credits, plan, limits or status changed)."""
        if self.invalidations is not None:
            self.invalidations.tenant(tenant_id)
        else:
            self.auth.invalidate(lambda p: p.tenant_id == tenant_id)

    def forget_key(self, key_id: str) -> None:
        """Every replica's cached principal of ``key_id`` (revoked or rolled)."""
        if self.invalidations is not None:
            self.invalidations.key(key_id)
        else:
            self.auth.invalidate(lambda p: p.key_id == key_id)


def make_limiters(redis_url: str | None) -> tuple[RateLimiter, QuotaStore]:
    """The rate limiter and quota store for this deployment: in-process without ``redis_url``, else Redis-backed
    (each with its own client, closed by its ``aclose``)."""
    if not redis_url:
        return InProcessRateLimiter(), InProcessQuotaStore()
    limiter = RedisRateLimiter(redis_client(redis_url), owns_client=True)
    quotas = RedisQuotaStore(redis_client(redis_url), owns_client=True)
    return limiter, quotas



def services_of(app: object) -> Services:
    """The app's services, typed: ``services_of(request.app)`` or ``services_of(client.app)`` in a test.

    ``app.state`` is untyped in Starlette; this is the one place that says what ``services`` on it is."""
    services = app.state.services  # type: ignore[attr-defined]  # Starlette's State is a bag of attributes
    if not isinstance(services, Services):
        raise TypeError(f"app.state.services is {type(services).__name__}, not Services")
    return services
