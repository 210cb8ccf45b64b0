"""The tenant dashboard: short-lived signed links, and the data behind the page.

A link's token is ``<tenant id>.<expires_at>.<signature>``: the signature is HMAC-SHA256 over the tenant id and
the expiry under a server secret (``MODELMETER_DASHBOARD_SECRET``, else derived from the admin token), compared
in constant time. Nothing is stored: a link works until it expires, and rotating the secret revokes every link.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Literal

from sqlmodel import Session

from modelmeter import clock
from modelmeter.billing import alerts, credits, invoicing
from modelmeter.billing.alerts import EventPublic
from modelmeter.billing.catalog import Plan, PlanCatalog
from modelmeter.billing.credits import CreditList
from modelmeter.billing.invoicing import InvoicePublic
from modelmeter.billing.periods import period_of
from modelmeter.billing.pricing import Usage
from modelmeter.billing.spend import budget_spend_micro, period_usage
from modelmeter.billing.usage import UsageQuery, usage_buckets
from modelmeter.errors import AuthenticationError, TenantSuspendedError
from modelmeter.money import micro_to_cents
from modelmeter.settings import Settings, ensure_admin_token
from modelmeter.shapes import Public
from modelmeter.tenancy.tenants import Tenant

_TOKEN_RE = re.compile(r"^(?P<tenant>[a-z]{1,16}_[0-9a-z]{1,64})\.(?P<exp>[0-9]{1,12})\.(?P<sig>[A-Za-z0-9_-]{43})$")
_KEY_CONTEXT = b"modelmeter/dashboard-links/v1"
INVALID_LINK = "This dashboard link is invalid or has expired; ask for a new one."
DAY = 86_400
CHART_DAYS = 30
ALERT_ROWS = 10  # the newest usage alerts the page lists
CREDIT_ROWS = 20  # the newest grants the page lists (the balance counts them all)


class DashboardLink(Public):
    """A signed, short-lived link to the tenant's dashboard page (``POST /v1/dashboard/links``)."""

    object: Literal["dashboard_link"]
    url: str
    expires_at: int


def signing_key(settings: Settings) -> bytes:
    """The dashboard secret, or a key derived from the admin token (never the admin token itself)."""
    if settings.dashboard_secret:
        return settings.dashboard_secret.encode()
    admin_token, _ = ensure_admin_token(settings)
    return hmac.new(admin_token.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


def _signature(key: bytes, tenant_id: str, expires_at: int) -> str:
    mac = hmac.new(key, f"{tenant_id}.{expires_at}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def issue_token(settings: Settings, tenant_id: str, *, ttl_s: int | None = None) -> tuple[str, int]:
    """A signed token for ``tenant_id`` and its expiry (Unix seconds)."""
    expires_at = clock.now_s() + (ttl_s if ttl_s is not None else settings.dashboard_link_ttl_s)
    return f"{tenant_id}.{expires_at}.{_signature(signing_key(settings), tenant_id, expires_at)}", expires_at


def issue_link(settings: Settings, tenant_id: str, base_url: str, *, ttl_s: int | None = None) -> DashboardLink:
    """A link to ``tenant_id``'s dashboard page on the gateway at ``base_url``."""
    token, expires_at = issue_token(settings, tenant_id, ttl_s=ttl_s)
    return DashboardLink(object="dashboard_link", url=f"{base_url.rstrip('/')}/dashboard?token={token}",
                         expires_at=expires_at)


def verify_token(settings: Settings, token: str) -> tuple[str, int]:
    """The tenant id and expiry of a genuine, unexpired token; 401 (one message) for anything else."""
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        raise AuthenticationError(INVALID_LINK, code="invalid_dashboard_link")
    tenant_id, expires_at = match["tenant"], int(match["exp"])
    expected = _signature(signing_key(settings), tenant_id, expires_at)
    if not hmac.compare_digest(expected.encode(), match["sig"].encode()):
        raise AuthenticationError(INVALID_LINK, code="invalid_dashboard_link")
    if expires_at <= clock.now_s():
        raise AuthenticationError(INVALID_LINK, code="dashboard_link_expired")
    return tenant_id, expires_at


# --- the page's data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayUsage:
    start: int
    requests: int
    tokens: int
    cost_cents: int


@dataclass(frozen=True)
class PageData:
    """Everything the page shows, read in one session."""

    tenant: Tenant
    plan: Plan
    period: str
    used: Usage
    spent_cents: int
    upcoming: InvoicePublic
    invoices: list[InvoicePublic]
    days: list[DayUsage]
    expires_at: int
    now: int
    credits: CreditList  # as ``GET /v1/billing/credits`` answers: the newest grants and the balance of all
    alerts: list[EventPublic] = field(default_factory=list)  # the newest events, as ``GET /v1/events`` lists


def load_tenant(*, session: Session, tenant_id: str) -> Tenant:
    """The link's tenant: gone → 401 (as a bad link), suspended → 403."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise AuthenticationError(INVALID_LINK, code="invalid_dashboard_link")
    if tenant.status != "active":
        raise TenantSuspendedError("This tenant is suspended; contact the operator.")
    return tenant


def daily_usage(*, session: Session, catalog: PlanCatalog, tenant: Tenant, now: int) -> list[DayUsage]:
    """The last ``CHART_DAYS`` UTC days, oldest first, days without usage included."""
    first = now - now % DAY - (CHART_DAYS - 1) * DAY
    buckets = usage_buckets(session=session, catalog=catalog, tenant_id=tenant.id,
                            q=UsageQuery(first, now + 1, "1d", None), current_plan=tenant.plan)
    by_start = {b.start_time: b.results for b in buckets}
    days = []
    for start in range(first, first + CHART_DAYS * DAY, DAY):
        results = by_start.get(start, [])
        days.append(DayUsage(start, sum(r.requests for r in results), sum(r.tokens for r in results),
                             sum(r.cost_cents for r in results)))
    return days


def load_page(*, session: Session, catalog: PlanCatalog, tenant_id: str, expires_at: int,
              live: dict[str, int] | None = None) -> PageData:
    """The dashboard of ``tenant_id``: this period's usage and spend, the upcoming and past invoices, the credit
    balance and grants (``live``: the quota store's balances per grant, as ``GET /v1/billing/credits`` takes)."""
    tenant = load_tenant(session=session, tenant_id=tenant_id)
    plan = catalog.get(tenant.plan)
    now = clock.now_s()
    period = period_of(now)
    used = period_usage(session=session, tenant_id=tenant.id, period=period)
    rows, _ = invoicing.list_invoices(session=session, tenant_id=tenant.id, limit=12, after=None)
    return PageData(
        tenant=tenant, plan=plan, period=period, used=used, spent_cents=micro_to_cents(budget_spend_micro(plan, used)),
        upcoming=invoicing.preview(session=session, catalog=catalog, tenant_id=tenant.id, plan=tenant.plan),
        invoices=[InvoicePublic.of(i, invoicing.lines_of(session=session, invoice_id=i.id)) for i in rows],
        days=daily_usage(session=session, catalog=catalog, tenant=tenant, now=now), expires_at=expires_at, now=now,
        credits=credits.credits_page(session=session, tenant_id=tenant.id, limit=CREDIT_ROWS, after=None, live=live),
        alerts=[EventPublic.of(e) for e in alerts.list_events(session=session, tenant_id=tenant.id,
                                                               limit=ALERT_ROWS, after=None,
                                                               types=(alerts.EVENT_TYPE,))[0]],
    )
