"""The running platform's parts, built once per app and reached through ``deps``."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as redis
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter.billing.alert_relay import AlertRelay
from modelmeter.billing.alerts import Alerts
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.ledger import LedgerWriter
from modelmeter.billing.metering import Meter
from modelmeter.billing.quota import InProcessQuotaStore, QuotaStore, RedisQuotaStore
from modelmeter.billing.ratelimit import InProcessRateLimiter, RateLimiter, RedisRateLimiter
from modelmeter.billing.stripe.relay import StripeRelay
from modelmeter.gateway.auth import KeyAuthenticator
from modelmeter.models.engine.client import EngineClient
from modelmeter.models.registry import ModelCache
from modelmeter.models.text import TextEncoders
from modelmeter.settings import Settings
from modelmeter.telemetry import Telemetry


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


def make_limiters(redis_url: str | None) -> tuple[RateLimiter, QuotaStore]:
    """The rate limiter and quota store for this deployment: in-process without ``redis_url``, else Redis-backed
    (each with its own client, closed by its ``aclose``)."""
    if not redis_url:
        return InProcessRateLimiter(), InProcessQuotaStore()
    limiter = RedisRateLimiter(redis.from_url(redis_url, decode_responses=True), owns_client=True)
    quotas = RedisQuotaStore(redis.from_url(redis_url, decode_responses=True), owns_client=True)
    return limiter, quotas
