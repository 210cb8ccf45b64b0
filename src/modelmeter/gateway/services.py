"""The running platform's parts, built once per app and reached through ``deps``."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.limits import QuotaStore, RateLimiter
from modelmeter.billing.metering import LedgerWriter, Meter
from modelmeter.billing.stripe.relay import StripeRelay
from modelmeter.gateway.auth import KeyAuthenticator
from modelmeter.models.registry import ModelCache
from modelmeter.models.serving import ModelServer
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
    server: ModelServer
    ledger: LedgerWriter
    rate: RateLimiter
    quota: QuotaStore
    meter: Meter
    telemetry: Telemetry = field(default_factory=Telemetry)
    stripe: StripeRelay | None = None  # set when a Stripe key is configured
