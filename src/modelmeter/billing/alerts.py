"""Usage alerts: a tenant's thresholds, and the events that fire when committed usage crosses them.

Thresholds are percentages of the monthly budget (the exact usage cost of the period, under the plan each row was
served on), or of the tenant's plan's included tokens when no budget is set. :func:`fire` runs inside the ledger
transaction that writes the usage rows (``record_usage``), so an event exists exactly when the usage that crossed
it does: a process killed after the commit loses nothing, and a replay or another replica writes nothing twice
(unique crossing, ``ON CONFLICT DO NOTHING``). A threshold fires once the period's usage has reached it and it
has not fired yet (:func:`reached`), so a group that no replica checked is caught up by the next one. Each new
event gets one delivery row per URL (the outbox the relay in :mod:`modelmeter.billing.alert_relay` sends).

The same events, outbox and relay carry ``batch.completed`` and ``batch.failed``
(:mod:`modelmeter.billing.batch_events`); ``EventPublic`` here is the shape of both kinds.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator
from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing.batch_events import BatchEventData, BatchRequestCounts
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.destinations import addresses, canonical_host, forbidden, is_local_name
from modelmeter.billing.pricing import Usage
from modelmeter.billing.spend import billed_spend_micro, usage_by_plan
from modelmeter.billing.tables import BATCH_KIND, AlertDelivery, AlertEvent, AlertSetting
from modelmeter.errors import ConflictError, NotFoundError
from modelmeter.ids import new_id
from modelmeter.money import MICRO_PER_CENT, micro_to_cents
from modelmeter.sealing import Sealer
from modelmeter.shapes import Public
from modelmeter.tenancy.tenants import Tenant, lock_tenant

if TYPE_CHECKING:
    from modelmeter.billing.ledger import UsageRecord

EVENT_TYPE = "usage.threshold_crossed"
EventType = Literal["usage.threshold_crossed", "batch.completed", "batch.failed"]
MAX_THRESHOLDS = 10
Resource = Literal["budget", "included_tokens"]


# --- settings ------------------------------------------------------------------------------------------


def _ascending(thresholds: list[int]) -> list[int]:
    if any(b <= a for a, b in pairwise(thresholds)):
        raise ValueError("thresholds must be strictly ascending")
    return thresholds


# What ``_http_url`` accepts, stated in the schema so that clients and fuzzers know: a scheme of http or https in
# any case, a host part, and no ASCII whitespace (spelled out: engines disagree on ``\s``).
_SPACE = " \t\n\r\f\v"
URL_PATTERN = f"^[Hh][Tt][Tt][Pp][Ss]?://[^/{_SPACE}][^{_SPACE}]*$"


def _http_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest.startswith("/") or any(
            c in _SPACE for c in url):
        raise ValueError("url must be an http:// or https:// URL")
    parts = urlsplit(url)
    canonical_host(parts.hostname or "")
    _ = parts.port  # a port that is not a number in range raises ValueError here, not at send time
    return url


def private_address(url: str, *, resolve: bool = False) -> bool:
    """Whether ``url``'s host is loopback, private, link-local, reserved, multicast or unspecified (itself or the
    IPv4 address an IPv6 form carries): an IP literal or ``localhost`` as written, and with ``resolve`` every
    address the name resolves to. An unresolvable name is not private (it fails to send). At send time the relay
    connects to an address it checked (``destinations.pin``)."""
    host = urlsplit(url).hostname or ""
    if is_local_name(host):
        return True
    return any(forbidden(a) for a in addresses(host, resolve=resolve))


class AlertSettingsUpdate(BaseModel):
    """``PUT /v1/billing/alerts``: thresholds in percent (1-1000, strictly ascending) and an http(s) URL."""

    model_config = ConfigDict(extra="forbid")

    thresholds: Annotated[
        list[Annotated[int, Strict(), Field(ge=1, le=1000)]],
        Field(min_length=1, max_length=MAX_THRESHOLDS, json_schema_extra={"uniqueItems": True}),
        AfterValidator(_ascending),
    ]
    url: Annotated[str, Strict(), Field(min_length=1, max_length=2000, json_schema_extra={"pattern": URL_PATTERN}),
                   AfterValidator(_http_url)]


_SECRET_PURPOSE = b"modelmeter/alert-secrets/v1"


def secret_sealer(admin_token: str) -> Sealer:
    """Alert signing secrets rest sealed (issue 21: they were readable to anyone who could read the database);
    each is bound to its tenant, so a sealed value copied onto another tenant's row does not open."""
    return Sealer(admin_token, _SECRET_PURPOSE)


def seal_plain_secrets(*, session: Session, sealer: Sealer) -> int:
    """Seal the signing secrets stored before they were sealed (at start-up; idempotent); returns how many."""
    rows = [r for r in session.exec(select(AlertSetting)).all() if not sealer.is_sealed(r.secret)]
    for row in rows:
        row.secret = sealer.seal_text(row.secret, row.tenant_id)
        session.add(row)
    session.commit()
    return len(rows)


def put_settings(*, session: Session, tenant_id: str, data: AlertSettingsUpdate, sealer: Sealer
                 ) -> AlertSettingsCreated:
    """Set the tenant's alerts with a new signing secret (committed, sealed); the body shows the secret, once."""
    now = clock.now_s()
    lock_tenant(session=session, tenant_id=tenant_id)
    row = session.get(AlertSetting, tenant_id)
    secret = "whsec_" + secrets.token_hex(24)
    stored = sealer.seal_text(secret, tenant_id)
    if row is None:
        row = AlertSetting(tenant_id=tenant_id, thresholds=data.thresholds, url=data.url, secret=stored, created=now,
                           updated=now)
    else:
        row.thresholds, row.url, row.secret, row.updated = list(data.thresholds), data.url, stored, now
    session.add(row)
    session.commit()
    return AlertSettingsCreated(**AlertSettingsPublic.of(row).model_dump(), secret=secret)


def get_settings(*, session: Session, tenant_id: str) -> AlertSettingsPublic:
    return AlertSettingsPublic.of(session.get(AlertSetting, tenant_id))


def delete_settings(*, session: Session, tenant_id: str) -> AlertSettingsPublic:
    """Remove the tenant's alerts (committed): no event fires from now on, and deliveries still pending are
    given up (``failed``, saying why) rather than POSTed to a URL its owner took back."""
    lock_tenant(session=session, tenant_id=tenant_id)
    row = session.get(AlertSetting, tenant_id)
    if row is not None:
        session.delete(row)
    session.exec(update(AlertDelivery).where(col(AlertDelivery.tenant_id) == tenant_id,
                                             col(AlertDelivery.status) == "pending")
                 .values(status="failed", locked_until=None, last_error="alert settings deleted"))
    session.commit()
    return AlertSettingsPublic.of(None)


def retry_delivery(*, session: Session, delivery_id: int) -> AlertDelivery:
    """Give a ``failed`` delivery a fresh start (the operator fixed, or heard from, the receiver): 404 for an
    unknown id, 409 unless it failed."""
    row = session.get(AlertDelivery, delivery_id)
    if row is None:
        raise NotFoundError(f"No event delivery '{delivery_id}'.", code="delivery_not_found", param="delivery_id")
    if row.status != "failed":
        raise ConflictError(f"Delivery {delivery_id} is {row.status}; only a failed delivery is retried.",
                            code="delivery_not_failed", param="delivery_id")
    if session.get(AlertSetting, row.tenant_id) is None:
        raise ConflictError("The tenant has deleted its alert settings; nothing is sent.",
                            code="alerts_deleted", param="delivery_id")
    row.status, row.attempts, row.next_attempt_at = "pending", 0, clock.now_s()
    row.locked_until, row.last_error = None, None
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


# --- events --------------------------------------------------------------------------------------------




def list_events(*, session: Session, tenant_id: str, limit: int, after: str | None,
                types: Collection[str] | None = None) -> tuple[list[AlertEvent], bool]:
    """The tenant's events (of ``types``, or all), newest first; ``after``: the id of the last event of the
    previous page."""
    query = select(AlertEvent).where(AlertEvent.tenant_id == tenant_id)
    if types is not None:
        query = query.where(col(AlertEvent.type).in_(sorted(types)))
    if after is not None:
        query = query.where(col(AlertEvent.id) < after)
    rows = list(session.exec(query.order_by(col(AlertEvent.id).desc()).limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


def list_deliveries(*, session: Session, status: str | None, limit: int,
                    after: int | None) -> tuple[list[AlertDelivery], bool]:
    """Deliveries (newest first), optionally of one status: what the operator checks when receivers fail."""
    query = select(AlertDelivery)
    if status is not None:
        query = query.where(AlertDelivery.status == status)
    if after is not None:
        query = query.where(col(AlertDelivery.id) < after)
    rows = list(session.exec(query.order_by(col(AlertDelivery.id).desc()).limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit




# --- public shapes: the settings, the event (one model for GET /v1/events and the webhook body), deliveries ---


class AlertSettingsPublic(Public):
    """The settings without the secret (``thresholds`` empty and ``url`` null when none are set)."""

    model_config = ConfigDict(title="AlertSettings")

    object: Literal["alert_settings"]
    thresholds: list[int]  # percent of the monthly budget, or of the plan's included tokens without one
    url: str | None

    @classmethod
    def of(cls, row: AlertSetting | None) -> AlertSettingsPublic:
        return cls(object="alert_settings", thresholds=list(row.thresholds) if row else [],
                   url=row.url if row else None)


class AlertSettingsCreated(AlertSettingsPublic):
    model_config = ConfigDict(title="AlertSettingsCreated")

    secret: str  # signs each delivery (header modelmeter-signature); shown only in this response


class EventData(Public):
    """``usage.threshold_crossed``: the threshold crossed, and the usage that crossed it."""

    period: str
    resource: Literal["budget", "included_tokens"]
    threshold_percent: int
    value: int  # cents spent (budget) or tokens used (included_tokens), when the threshold was crossed
    limit: int  # the budget in cents, or the included tokens


class EventPublic(Public):
    """An event, as ``GET /v1/events`` lists it and as the alert relay POSTs it to the tenant's URL (the body
    the ``modelmeter-signature`` header signs: this model's compact JSON). ``type`` says which ``data`` it carries:
    ``EventData`` for ``usage.threshold_crossed``, ``BatchEventData`` for ``batch.completed`` and ``batch.failed``
    (the two share no field and take no other, so a ``data`` matches exactly one)."""

    model_config = ConfigDict(title="Event")

    id: str
    object: Literal["event"]
    type: EventType
    created: int
    data: EventData | BatchEventData

    @model_validator(mode="after")
    def _data_of_its_type(self) -> EventPublic:
        if isinstance(self.data, BatchEventData) != self.type.startswith("batch."):
            raise ValueError(f"a {self.type} event carries {type(self.data).__name__}")
        return self

    @classmethod
    def of(cls, event: AlertEvent) -> EventPublic:
        data: EventData | BatchEventData
        if event.batch_id is not None:
            data = BatchEventData(
                id=event.batch_id, status=event.type.removeprefix("batch."),
                request_counts=BatchRequestCounts(total=event.requests_total, completed=event.requests_completed,
                                                  failed=event.requests_failed),
                output_file_id=event.output_file_id, error_file_id=event.error_file_id)
        else:
            data = EventData(period=event.period, resource=event.resource, threshold_percent=event.threshold_percent,
                             value=event.value, limit=event.limit_value)
        return cls(id=event.id, object="event", type=event.type, created=event.created, data=data)


class EventDeliveryPublic(Public):
    model_config = ConfigDict(title="EventDelivery")

    id: str
    object: Literal["event_delivery"]
    event_id: str
    tenant_id: str
    url: str
    status: Literal["pending", "done", "failed"]
    attempts: int
    next_attempt_at: int
    last_status: int | None  # the receiver's last HTTP status (None: no answer)
    last_error: str | None
    created: int
    done_at: int | None

    @classmethod
    def of(cls, row: AlertDelivery) -> EventDeliveryPublic:
        return cls(id=str(row.id), object="event_delivery", event_id=row.event_id, tenant_id=row.tenant_id,
                   url=row.url, status=row.status,
                   attempts=row.attempts, next_attempt_at=row.next_attempt_at, last_status=row.last_status,
                   last_error=row.last_error, created=row.created, done_at=row.done_at)


# --- firing, inside the ledger transaction --------------------------------------------------------------


def reached(thresholds: Sequence[int], after: int, limit: int, fired: set[int]) -> list[int]:
    """Thresholds reached by ``after`` that have not fired yet this period, ascending. Firing on what is reached
    (not only on what this group crossed) catches up a crossing that no group reported: usage served by a replica
    that had not yet seen the tenant's new settings, or thresholds set when spend was already past them."""
    if limit <= 0:
        return []
    return [t for t in sorted(thresholds) if t * limit <= after * 100 and t not in fired]


@dataclass(frozen=True, slots=True)
class Crossing:
    tenant_id: str
    period: str
    resource: Resource
    threshold_percent: int
    value: int
    limit: int
    url: str


_EVENT_INSERTS = {
    name: dialect.insert(AlertEvent).on_conflict_do_nothing(
        index_elements=["tenant_id", "period", "resource", "threshold_percent"]).returning(col(AlertEvent.id))
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_DELIVERY_INSERT = sa_insert(AlertDelivery)


class Alerts:
    """The ledger's alert hook: :meth:`fire` is called by ``record_usage`` with the rows it has just inserted."""

    def __init__(self, catalog: PlanCatalog) -> None:
        self._catalog = catalog
        self._tenants: frozenset[str] | None = None  # None: unknown yet, look every group up

    def refresh(self, engine: Engine) -> None:
        """Load the set of tenants with alerts (the gateway calls this every ``alerts_refresh_s``, off the request
        path): a group of tenants outside it costs no query. A PUT on this process adds its tenant at once; one
        on another replica is seen here within the refresh interval."""
        with engine.connect() as conn:
            self._tenants = frozenset(conn.execute(sa_select(col(AlertSetting.tenant_id))).scalars())

    def add(self, tenant_id: str) -> None:
        if self._tenants is not None:
            self._tenants = self._tenants | {tenant_id}

    def discard(self, tenant_id: str) -> None:
        """A tenant whose settings are gone (``fire`` reads the settings, so this only saves the lookup)."""
        if self._tenants is not None:
            self._tenants = self._tenants - {tenant_id}

    def concerns(self, written: Sequence[UsageRecord]) -> bool:
        """Whether any row's tenant may have alerts (every tenant may, until the set is first loaded)."""
        known = self._tenants
        return known is None or any(r.tenant_id in known for r in written)

    def fire(self, conn: Connection, written: Sequence[UsageRecord], periods: dict[str, str]) -> int:
        """Write an event (and its delivery) for every threshold the new rows ``written`` cross; returns how many.

        Tenants outside the refreshed set of tenants with alerts cost nothing; for the others, one indexed lookup
        per commit group reads their settings. On
        PostgreSQL it locks their settings rows, so concurrent groups of one tenant (other replicas) compute
        their totals one after the other and a crossing can never fall between two groups' snapshots."""
        known = self._tenants
        tenants = sorted({r.tenant_id for r in written if known is None or r.tenant_id in known})
        if not tenants:
            return 0
        query = (sa_select(col(AlertSetting.tenant_id), col(AlertSetting.thresholds), col(AlertSetting.url),
                           col(Tenant.monthly_budget_cents), col(Tenant.plan))
                 .join(Tenant, col(Tenant.id) == col(AlertSetting.tenant_id))
                 .where(col(AlertSetting.tenant_id).in_(tenants)).order_by(col(AlertSetting.tenant_id)))
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(of=AlertSetting)
        settings = {row[0]: row[1:] for row in conn.execute(query).all()}
        if not settings:
            return 0
        added: dict[tuple[str, str], dict[str, Usage]] = defaultdict(lambda: defaultdict(Usage))
        for r in written:
            if r.tenant_id in settings:
                by_plan = added[(r.tenant_id, periods[r.request_id])]
                batch = r.kind == BATCH_KIND
                by_plan[r.plan] += Usage(r.requests, r.tokens, r.training_tokens, r.requests if batch else 0,
                                         r.tokens if batch else 0)
        crossings: list[Crossing] = []
        for tenant_id, period in added:
            thresholds, url, budget_cents, plan_id = settings[tenant_id]
            after = usage_by_plan(conn, tenant_id=tenant_id, period=period)
            crossings += self._crossings(conn, tenant_id, period, list(thresholds), url, budget_cents, plan_id,
                                         after)
        return self._write(conn, crossings)

    def _crossings(self, conn: Connection, tenant_id: str, period: str, thresholds: list[int], url: str,
                   budget_cents: int | None, plan_id: str, after: dict[str, Usage]) -> list[Crossing]:
        if budget_cents is not None:
            resource: Resource = "budget"

            def measure(usage: dict[str, Usage]) -> int:
                return billed_spend_micro(self._catalog, usage, plan_id)

            limit, value_after = budget_cents * MICRO_PER_CENT, measure(after)
            hits = reached(thresholds, value_after, limit, self._fired(conn, tenant_id, period, resource))
            value, limit_out = micro_to_cents(value_after), budget_cents
        else:
            resource = "included_tokens"
            limit = limit_out = self._catalog.get(plan_id).included_tokens if plan_id in self._catalog else 0
            value = sum(u.tokens for u in after.values())
            hits = reached(thresholds, value, limit, self._fired(conn, tenant_id, period, resource))
        return [Crossing(tenant_id, period, resource, t, value, limit_out, url) for t in hits]

    @staticmethod
    def _fired(conn: Connection, tenant_id: str, period: str, resource: str) -> set[int]:
        query = sa_select(col(AlertEvent.threshold_percent)).where(
            col(AlertEvent.tenant_id) == tenant_id, col(AlertEvent.period) == period,
            col(AlertEvent.resource) == resource)
        return {t for t in conn.execute(query).scalars() if t is not None}  # a crossing's is never NULL

    def _write(self, conn: Connection, crossings: list[Crossing]) -> int:
        if not crossings:
            return 0
        now = clock.now_s()
        base = new_id("evt")  # one time-ordered prefix, then the crossing's rank: ids ascend with the thresholds
        values = [{"id": f"{base}{i:02d}", "type": EVENT_TYPE, "tenant_id": c.tenant_id, "period": c.period,
                   "resource": c.resource, "threshold_percent": c.threshold_percent, "value": c.value,
                   "limit_value": c.limit, "created": now} for i, c in enumerate(crossings)]
        new = {event_id for (event_id,) in conn.execute(_EVENT_INSERTS[conn.dialect.name], values).all()}
        deliveries = [{"event_id": v["id"], "tenant_id": c.tenant_id, "url": c.url, "status": "pending",
                       "attempts": 0, "next_attempt_at": now, "created": now}
                      for v, c in zip(values, crossings, strict=True) if v["id"] in new]
        if deliveries:
            conn.execute(_DELIVERY_INSERT, deliveries)
        return len(new)
