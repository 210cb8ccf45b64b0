"""The running platform's parts, built once per app and reached through ``deps``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
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
from modelmeter.gateway.auth import FailedAuthThrottle, KeyAuthenticator
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
    failed_auth: FailedAuthThrottle = field(default_factory=lambda: FailedAuthThrottle(per_minute=30))


def make_limiters(redis_url: str | None) -> tuple[RateLimiter, QuotaStore]:
    """The rate limiter and quota store for this deployment: in-process without ``redis_url``, else Redis-backed
    (each with its own client, closed by its ``aclose``)."""
    if not redis_url:
        return InProcessRateLimiter(), InProcessQuotaStore()
    limiter = RedisRateLimiter(redis_client(redis_url), owns_client=True)
    quotas = RedisQuotaStore(redis_client(redis_url), owns_client=True)
    return limiter, quotas


def redis_client(redis_url: str) -> redis.Redis:
    """A client that gives up within ~2 s when Redis is unreachable (the request then answers 503
    ``service_unavailable``): redis-py's defaults wait 5 s per socket operation and retry three times with up to
    10 s of backoff. One quick retry, on a fresh connection, covers a pooled connection the server closed."""
    secure = redis_url.startswith("rediss://")
    return redis.from_url(redis_url, decode_responses=True, socket_timeout=0.75, socket_connect_timeout=0.5,
                          retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
                          connection_class=_SecureConnection if secure else _Connection)


class _ClosedTransportIsConnectionError:
    """Under uvloop, writing to a connection the peer has reset raises RuntimeError ("the handler is closed"),
    which redis-py neither converts nor retries: tests/integration/test_dependency_faults.py found it as 500s
    during a Redis outage. Here it is what it means, a ConnectionError (retried once, then a 503)."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:  # redis-py has already dropped the connection
            raise redis_errors.ConnectionError(f"Error while writing to socket: {exc}") from exc


class _Connection(_ClosedTransportIsConnectionError, redis.Connection):
    pass


class _SecureConnection(_ClosedTransportIsConnectionError, redis.SSLConnection):
    pass
