"""Stripe, exactly once: a transactional outbox, a relay that sends it through an injected ``StripeClient``, and
the webhook events that come back.

Mapping (every Stripe id is kept on our side)
    tenant          -> Customer (email, name, ``metadata.tenant_id``)              ``tenant.stripe_customer_id``
    plan            -> Product ``mm_<plan>`` + Plan ``mm_<plan>_<currency>_monthly``  ``stripe_plan``
    tenant's plan   -> Subscription to that Plan (``metadata.mm_change_id``)       ``tenant.stripe_subscription_id``
    closed invoice  -> one invoice item per line, with the line's exact ``amount`` in cents, then an Invoice that
                       takes them (``metadata.mm_invoice_id``), finalised where the API allows
                                               ``invoice.stripe_invoice_id``, ``invoice_line.stripe_invoice_item_id``
    Stripe prices nothing itself: every cent comes from our invoice lines (the base fee is one of them, prorated by
    the second), so the Plan behind a subscription is priced 0 and no charge can be counted twice.

Exactly once
    1. ``enqueue_*`` writes a ``stripe_outbox`` row in the transaction of the change that causes it, with a
       deterministic idempotency key ``mm-<kind>-<object_id>`` (only when Stripe is configured: ``enable_outbox``).
    2. ``StripeRelay`` leases a due row, looks in Stripe for the object carrying our metadata, creates it only when
       absent (passing the idempotency key), then records the Stripe ids and marks the row done in one transaction.
       A crash between the Stripe call and the mark leaves the row pending; the next attempt finds the object
       instead of creating a second one (Stripe forgets idempotency keys after 24 hours; emulators ignore them).
    3. One tenant's rows go in ``id`` order: a row that waits holds back that tenant's later rows. Network and
       server errors retry forever with exponential backoff; other errors ``max_attempts`` times, then ``failed``.

Webhooks
    ``handle_event`` applies a verified event once (``stripe_event`` is keyed by event id). The state it leaves is a
    function of the set of events received, not of their order: ``paid`` is final, a payment failure only records
    its earliest time, and a tenant is ``past_due`` while one of its unpaid invoices has a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
import stripe
from sqlalchemy import ColumnElement, column, false, func, or_, table, update
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.tables import Invoice, InvoiceLine, PlanChange, StripeEvent, StripeOutbox, StripePlan
from modelmeter.settings import Settings

log = logging.getLogger("modelmeter.stripe")

OUTBOX_FLAG = "stripe_outbox"
LEASE_S = 300
BACKOFF_BASE_S = 2
BACKOFF_CAP_S = 3600
TEST_KEY_PREFIXES = ("sk_test_", "rk_test_")

# The tenant table belongs to the gateway; billing reaches it through these columns only (no gateway import).
_TENANT = table(
    "tenant", column("id"), column("email"), column("name"), column("status"), column("billing_status"),
    column("past_due_since"), column("stripe_customer_id"), column("stripe_subscription_id"),
    column("suspension_reason"), column("updated"),
)

T = TypeVar("T")


class StripeConfigError(ValueError):
    """A Stripe setting refused at start-up (a live key without live mode)."""


class PermanentSyncError(RuntimeError):
    """Retrying cannot fix this row (the row is marked ``failed`` at once)."""


# --- writing the outbox (called inside the transaction of the change) ---------------------------------------


def idempotency_key(kind: str, object_id: str) -> str:
    """The deterministic key of one Stripe mutation, saved with the row before the call."""
    return f"mm-{kind}-{object_id}"


def enable_outbox(sessions: sessionmaker[Session]) -> None:
    """Make the data functions of every session from ``sessions`` write Stripe outbox rows."""
    sessions.configure(info={**sessions.kw.get("info", {}), OUTBOX_FLAG: True})


def outbox_enabled(session: Session) -> bool:
    return bool(session.info.get(OUTBOX_FLAG))


def _enqueue(session: Session, *, kind: str, object_id: str, tenant_id: str, payload: dict[str, Any]) -> bool:
    if not outbox_enabled(session):
        return False
    now = clock.now_s()
    session.add(StripeOutbox(kind=kind, object_id=object_id, tenant_id=tenant_id, payload=payload,
                             idempotency_key=idempotency_key(kind, object_id), next_attempt_at=now, created=now))
    return True


def enqueue_customer(*, session: Session, tenant_id: str, email: str, name: str) -> None:
    """Queue the tenant's Customer (in the transaction that creates the tenant)."""
    _enqueue(session, kind="customer", object_id=tenant_id, tenant_id=tenant_id,
             payload={"email": email, "name": name})


def enqueue_plan_change(*, session: Session, change: PlanChange) -> None:
    """Queue the subscription to the tenant's new plan (in the transaction that records the change)."""
    if not outbox_enabled(session):
        return
    session.flush()  # the change's id names the subscription
    _enqueue(session, kind="subscription", object_id=f"{change.tenant_id}-{change.id}", tenant_id=change.tenant_id,
             payload={"plan": change.plan, "change_id": change.id})


def enqueue_invoice(*, session: Session, invoice: Invoice, has_lines: bool) -> None:
    """Queue a closed invoice (in the closing transaction); an invoice without lines has nothing to send."""
    if has_lines and _enqueue(session, kind="invoice", object_id=invoice.id, tenant_id=invoice.tenant_id,
                              payload={"period": invoice.period, "total": invoice.total}):
        invoice.sync_status = "pending"
        session.add(invoice)


# --- the client -------------------------------------------------------------------------------------------------


def check_key(api_key: str, *, live_mode: bool) -> None:
    """Refuse anything but a test-mode key unless live mode is explicitly enabled."""
    if not live_mode and not api_key.startswith(TEST_KEY_PREFIXES):
        raise StripeConfigError(
            "MODELMETER_STRIPE_API_KEY must be a test-mode key (sk_test_...); "
            "set MODELMETER_STRIPE_LIVE_MODE=true to use a live key."
        )


def make_client(settings: Settings) -> tuple[stripe.StripeClient, Callable[[], None]]:
    """A ``StripeClient`` for the settings' key and API base, and the function that closes its connections."""
    assert settings.stripe_api_key
    check_key(settings.stripe_api_key, live_mode=settings.stripe_live_mode)
    http = requests.Session()
    client = stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
        max_network_retries=settings.stripe_max_network_retries,
        http_client=stripe.RequestsClient(session=http, timeout=settings.stripe_timeout_s),
    )
    return client, http.close


def relay_from_settings(settings: Settings, *, sessions: sessionmaker[Session], catalog: PlanCatalog,
                        on_suspend: Callable[[str], None] | None = None) -> StripeRelay | None:
    """The relay when a Stripe key is configured (and the outbox switched on for ``sessions``), else ``None``."""
    if not settings.stripe_api_key:
        return None
    client, close = make_client(settings)
    enable_outbox(sessions)
    return StripeRelay(client=client, sessions=sessions, catalog=catalog, max_attempts=settings.stripe_max_attempts,
                       grace_s=settings.past_due_grace_s, on_suspend=on_suspend, on_close=close)


# --- the relay --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What one row made in Stripe, and how to record it on our side (in the transaction that marks it done)."""

    stripe_id: str
    record: Callable[[Session], None]


@dataclass(frozen=True)
class RowOutcome:
    id: int
    kind: str
    object_id: str
    result: str  # done | retry | failed
    stripe_id: str | None = None
    error: str | None = None


@dataclass
class RelayReport:
    """What one pass of the relay did."""

    rows: list[RowOutcome] = field(default_factory=list)
    suspended: list[str] = field(default_factory=list)

    def count(self, result: str) -> int:
        return sum(1 for row in self.rows if row.result == result)

    def public(self) -> dict[str, Any]:
        return {"object": "stripe_sync", "sent": self.count("done"), "retrying": self.count("retry"),
                "failed": self.count("failed"), "suspended": self.suspended,
                "rows": [row.__dict__ for row in self.rows]}

    def summary(self) -> str:
        lines = [f"{r.kind:<12} {r.object_id:<40} {r.result:<6} {r.stripe_id or r.error or ''}" for r in self.rows]
        lines += [f"suspended    {tenant_id:<40} past due beyond the grace period" for tenant_id in self.suspended]
        totals = f"sent {self.count('done')}, retrying {self.count('retry')}, failed {self.count('failed')}"
        return "\n".join([*lines, totals])


def backoff_s(attempts: int) -> int:
    """Seconds before attempt ``attempts + 1``: 2, 4, 8, ... capped at an hour."""
    return int(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


def retryable(exc: BaseException) -> bool:
    """Errors that time may fix: network, rate limits, Stripe's own 5xx."""
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError):
        return True
    return isinstance(exc, stripe.APIError) and (exc.http_status or 500) >= 500


class StripeRelay:
    """Sends the outbox to Stripe, one lease-protected row at a time, and enforces the past-due grace period."""

    def __init__(self, *, client: stripe.StripeClient, sessions: sessionmaker[Session], catalog: PlanCatalog,
                 max_attempts: int = 10, grace_s: int = 7 * 24 * 3600, lease_s: int = LEASE_S, batch: int = 100,
                 on_suspend: Callable[[str], None] | None = None, on_close: Callable[[], None] | None = None) -> None:
        self._client = client
        self._sessions = sessions
        self._catalog = catalog
        self._max_attempts = max_attempts
        self._grace_s = grace_s
        self._lease_s = lease_s
        self._batch = batch
        self._on_suspend = on_suspend or (lambda _tenant_id: None)
        self._on_close = on_close
        self._plans: dict[str, StripePlan] = {}
        self._handlers: dict[str, Callable[[StripeOutbox], Sent]] = {
            "customer": self._send_customer, "subscription": self._send_subscription, "invoice": self._send_invoice,
        }
        self._tick_lock = threading.Lock()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # lifecycle

    def start(self, interval_s: int) -> None:
        """Run ``tick`` every ``interval_s`` seconds in a worker thread until ``aclose`` (call from the event loop)."""
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run_forever(interval_s))

    async def _run_forever(self, interval_s: int) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval_s)
            if self._stop.is_set():
                return
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("Stripe sync failed; will retry")

    async def aclose(self) -> None:
        """Stop the loop after the row in flight, then close the client's connections."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        self.close()

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()

    # one pass

    def tick(self, *, retry_failed: bool = False) -> RelayReport:
        """Send what is due, then suspend tenants past due beyond the grace period."""
        with self._tick_lock:
            if retry_failed:
                self.requeue_failed()
            report = self.run_once()
            report.suspended = self.enforce_grace()
            return report

    def run_once(self) -> RelayReport:
        """Send every due row once, in order per tenant (in batches, while batches make progress)."""
        report = RelayReport()
        while not self._stop.is_set():
            due = self._due()
            if self._pass(due, report) == 0 or len(due) < self._batch:
                return report
        return report

    def _pass(self, rows: list[StripeOutbox], report: RelayReport) -> int:
        blocked: set[str] = set()
        sent = 0
        for row in rows:
            if self._stop.is_set():
                break
            if row.tenant_id in blocked or self._waits_behind(row) or not self._claim(row):
                blocked.add(row.tenant_id)
                continue
            outcome = self._send(row)
            report.rows.append(outcome)
            sent += 1
            if outcome.result != "done":
                blocked.add(row.tenant_id)
        return sent

    def requeue_failed(self) -> int:
        """Give every ``failed`` row a fresh start (after the cause has been fixed)."""
        now = clock.now_s()
        with self._sessions() as session:
            rows = session.exec(select(StripeOutbox).where(StripeOutbox.status == "failed")).all()
            for row in rows:
                row.status, row.attempts, row.next_attempt_at = "pending", 0, now
                session.add(row)
                _set_invoice_sync(session, row, "pending")
            session.commit()
            return len(rows)

    def enforce_grace(self) -> list[str]:
        """Suspend tenants that have been past due longer than the grace period."""
        with self._sessions() as session:
            suspended = suspend_overdue(session, now=clock.now_s(), grace_s=self._grace_s)
            session.commit()
        for tenant_id in suspended:
            self._on_suspend(tenant_id)
        return suspended

    # rows

    def _due(self) -> list[StripeOutbox]:
        now = clock.now_s()
        query = (
            select(StripeOutbox)
            .where(StripeOutbox.status == "pending", col(StripeOutbox.next_attempt_at) <= now,
                   or_(col(StripeOutbox.locked_until).is_(None), col(StripeOutbox.locked_until) <= now))
            .order_by(col(StripeOutbox.id)).limit(self._batch)
        )
        with self._sessions() as session:
            return list(session.exec(query).all())

    def _waits_behind(self, row: StripeOutbox) -> bool:
        """An earlier row of the same tenant is not done yet (waiting, leased or failed): keep the order."""
        query = select(StripeOutbox.id).where(StripeOutbox.tenant_id == row.tenant_id,
                                              col(StripeOutbox.id) < row.id, StripeOutbox.status != "done")
        with self._sessions() as session:
            return session.exec(query.limit(1)).first() is not None

    def _claim(self, row: StripeOutbox) -> bool:
        """Lease a due row (compare-and-set, so two relays never send the same row at once)."""
        now = clock.now_s()
        statement = (
            update(StripeOutbox)
            .where(col(StripeOutbox.id) == row.id, col(StripeOutbox.status) == "pending",
                   col(StripeOutbox.next_attempt_at) <= now,
                   or_(col(StripeOutbox.locked_until).is_(None), col(StripeOutbox.locked_until) <= now))
            .values(locked_until=now + self._lease_s, attempts=col(StripeOutbox.attempts) + 1)
        )
        with self._sessions() as session:
            claimed = session.exec(statement).rowcount == 1
            session.commit()
        if claimed:
            row.attempts += 1
        return claimed

    def _send(self, row: StripeOutbox) -> RowOutcome:
        assert row.id is not None
        try:
            sent = self._handlers[row.kind](row)
        except Exception as exc:
            return self._failed(row, exc)
        self._complete(row, sent)
        return RowOutcome(row.id, row.kind, row.object_id, "done", stripe_id=sent.stripe_id)

    def _complete(self, row: StripeOutbox, sent: Sent) -> None:
        """Record the Stripe ids and mark the row done, in one transaction."""
        with self._sessions() as session:
            sent.record(session)
            done = session.get(StripeOutbox, row.id)
            assert done is not None
            done.status, done.done_at, done.locked_until = "done", clock.now_s(), None
            done.stripe_id, done.last_error = sent.stripe_id, None
            session.add(done)
            session.commit()

    def _failed(self, row: StripeOutbox, exc: Exception) -> RowOutcome:
        assert row.id is not None
        give_up = isinstance(exc, PermanentSyncError) or (not retryable(exc) and row.attempts >= self._max_attempts)
        error = f"{type(exc).__name__}: {exc}"[:1000]
        log.warning("Stripe sync of %s %s failed (attempt %d%s): %s", row.kind, row.object_id, row.attempts,
                    ", giving up" if give_up else "", error)
        with self._sessions() as session:
            stored = session.get(StripeOutbox, row.id)
            assert stored is not None
            stored.status = "failed" if give_up else "pending"
            stored.next_attempt_at = clock.now_s() + backoff_s(row.attempts)
            stored.locked_until, stored.last_error = None, error
            session.add(stored)
            if give_up:
                _set_invoice_sync(session, row, "failed")
            session.commit()
        return RowOutcome(row.id, row.kind, row.object_id, "failed" if give_up else "retry", error=error)

    # customers

    def _send_customer(self, row: StripeOutbox) -> Sent:
        tenant_id = row.tenant_id
        customer = self._ensure_customer(tenant_id, row.payload["email"], row.payload["name"], row.idempotency_key)
        return Sent(customer.id, lambda s: _set_tenant(s, tenant_id, stripe_customer_id=customer.id))

    def _ensure_customer(self, tenant_id: str, email: str, name: str, key: str) -> stripe.Customer:
        found = self._client.v1.customers.list(params={"email": email, "limit": 100})
        for customer in found.auto_paging_iter():
            if _meta(customer).get("tenant_id") == tenant_id:
                return customer
        return self._client.v1.customers.create(
            params={"email": email, "name": name, "metadata": {"tenant_id": tenant_id}},
            options={"idempotency_key": key},
        )

    def _customer_id(self, tenant_id: str) -> str:
        """The tenant's Customer id; created here when the tenant predates Stripe being switched on."""
        with self._sessions() as session:
            found = session.exec(select(_TENANT.c.stripe_customer_id, _TENANT.c.email, _TENANT.c.name)
                                 .where(_TENANT.c.id == tenant_id)).first()
        if found is None:
            raise PermanentSyncError(f"tenant {tenant_id} does not exist")
        customer_id, email, name = found
        if customer_id:
            return str(customer_id)
        customer = self._ensure_customer(tenant_id, email, name, idempotency_key("customer", tenant_id))
        with self._sessions() as session:
            _set_tenant(session, tenant_id, stripe_customer_id=customer.id)
            session.commit()
        return customer.id

    # plans and subscriptions

    def _send_subscription(self, row: StripeOutbox) -> Sent:
        tenant_id, change_id = row.tenant_id, str(row.payload["change_id"])
        customer_id = self._customer_id(tenant_id)
        mapping = self._ensure_plan(row.payload["plan"])
        ours = [s for s in self._client.v1.subscriptions.list(
            params={"customer": customer_id, "status": "all", "limit": 100}).auto_paging_iter()
            if _meta(s).get("tenant_id") == tenant_id]
        current = next((s for s in ours if _meta(s).get("mm_change_id") == change_id), None)
        if current is None:
            current = self._client.v1.subscriptions.create(
                params={"customer": customer_id, "items": [{"plan": mapping.price_id}],
                        "metadata": {"tenant_id": tenant_id, "mm_plan": mapping.plan, "mm_change_id": change_id}},
                options={"idempotency_key": row.idempotency_key},
            )
        for old in ours:  # the subscriptions of earlier plan changes
            if old.id != current.id and old.status not in ("canceled", "incomplete_expired"):
                self._client.v1.subscriptions.cancel(old.id)
        subscription_id = current.id

        def record(session: Session) -> None:
            session.merge(mapping)
            _set_tenant(session, tenant_id, stripe_subscription_id=subscription_id)

        return Sent(subscription_id, record)

    def _ensure_plan(self, plan_id: str) -> StripePlan:
        """The Product and the (zero-priced) monthly Plan that mirror a catalog plan, created once."""
        if plan_id in self._plans:
            return self._plans[plan_id]
        plan = self._catalog.get(plan_id)
        product_id, price_id = f"mm_{plan.id}", f"mm_{plan.id}_{plan.currency}_monthly"
        _retrieve_or_create(lambda: self._client.v1.products.retrieve(product_id),
                            lambda: self._client.v1.products.create(
                                params={"id": product_id, "name": plan.name, "metadata": {"mm_plan": plan.id}}))
        _retrieve_or_create(lambda: self._client.v1.plans.retrieve(price_id),
                            lambda: self._client.v1.plans.create(params={
                                "id": price_id, "product": product_id, "amount": 0, "currency": plan.currency,
                                "interval": "month", "nickname": f"{plan.name} (priced by modelmeter invoices)",
                                "metadata": {"mm_plan": plan.id, "mm_base_fee_cents": str(plan.base_fee_cents)}}))
        mapping = StripePlan(plan=plan.id, product_id=product_id, price_id=price_id, synced_at=clock.now_s())
        self._plans[plan_id] = mapping
        return mapping

    # invoices

    def _send_invoice(self, row: StripeOutbox) -> Sent:
        invoice, lines = self._load_invoice(row.object_id)
        customer_id = self._customer_id(invoice.tenant_id)
        found = self._find_invoice(customer_id, invoice.id)
        if found is None:
            self._ensure_items(row, customer_id, invoice, lines)
            found = self._client.v1.invoices.create(
                params={"customer": customer_id, "description": f"modelmeter {invoice.period}",
                        "metadata": _invoice_metadata(invoice), "pending_invoice_items_behavior": "include"},
                options={"idempotency_key": row.idempotency_key},
            )
        found = self._settle(found, invoice)
        items = self._check_amounts(found, invoice, lines)
        invoice_id, stripe_id = invoice.id, found.id
        return Sent(stripe_id, lambda s: _record_invoice(s, invoice_id, stripe_id, items))

    def _load_invoice(self, invoice_id: str) -> tuple[Invoice, list[InvoiceLine]]:
        with self._sessions() as session:
            invoice = session.get(Invoice, invoice_id)
            if invoice is None:
                raise PermanentSyncError(f"invoice {invoice_id} does not exist")
            query = select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id).order_by(col(InvoiceLine.position))
            return invoice, list(session.exec(query).all())

    def _find_invoice(self, customer_id: str, invoice_id: str) -> stripe.Invoice | None:
        """The Stripe invoice that carries our invoice: by its metadata, or by the metadata of its lines."""
        found = self._client.v1.invoices.list(params={"customer": customer_id, "limit": 100})
        for candidate in found.auto_paging_iter():
            lines = candidate.lines.data if candidate.lines else []
            if _meta(candidate).get("mm_invoice_id") == invoice_id or any(
                    _meta(line).get("mm_invoice_id") == invoice_id for line in lines):
                return candidate
        return None

    def _ensure_items(self, row: StripeOutbox, customer_id: str, invoice: Invoice, lines: list[InvoiceLine]) -> None:
        """One pending invoice item per line; items left by an interrupted attempt are reused, not repeated."""
        pending = self._client.v1.invoice_items.list(params={"customer": customer_id, "limit": 100})
        have = {_meta(item).get("mm_line") for item in pending.auto_paging_iter()
                if _meta(item).get("mm_invoice_id") == invoice.id and not item.invoice}
        for line in lines:
            if str(line.position) in have:
                continue
            self._client.v1.invoice_items.create(
                params={"customer": customer_id, "amount": line.amount, "currency": invoice.currency,
                        "description": line.description, "metadata": _line_metadata(invoice, line)},
                options={"idempotency_key": f"{row.idempotency_key}-line-{line.position}"},
            )

    def _settle(self, found: stripe.Invoice, invoice: Invoice) -> stripe.Invoice:
        """Make sure the Stripe invoice names ours, and finalise a draft so Stripe collects it."""
        assert found.id is not None
        if _meta(found).get("mm_invoice_id") != invoice.id:
            found = self._client.v1.invoices.update(found.id, params={"metadata": _invoice_metadata(invoice)})
        if found.status != "draft":
            return found
        try:
            return self._client.v1.invoices.finalize_invoice(found.id, params={"auto_advance": True})
        except stripe.APIError as exc:
            if exc.http_status != 404:
                raise
            log.info("this Stripe API cannot finalise invoices (an emulator?); %s stays a draft", found.id)
            return found

    def _check_amounts(self, found: stripe.Invoice, invoice: Invoice, lines: list[InvoiceLine]) -> dict[int, str]:
        """Our lines on the Stripe invoice must be exactly ours; returns their invoice item ids by position."""
        assert found.id is not None
        remote = self._client.v1.invoices.line_items.list(found.id, params={"limit": 100}).auto_paging_iter()
        ours = [line for line in remote if _meta(line).get("mm_invoice_id") == invoice.id]
        got = sorted((int(_meta(line)["mm_line"]), line.amount) for line in ours)  # a duplicate shows up here
        if got != [(line.position, line.amount) for line in lines]:
            raise PermanentSyncError(f"Stripe invoice {found.id} does not carry the lines of {invoice.id} exactly")
        if found.total != invoice.total:
            log.warning("Stripe invoice %s totals %s, ours %s: it carries lines of its own", found.id, found.total,
                        invoice.total)
        return {int(_meta(line)["mm_line"]): _item_id(line) for line in ours}


# --- recording on our side --------------------------------------------------------------------------------------


def _set_tenant(session: Session, tenant_id: str, **values: Any) -> None:
    session.exec(update(_TENANT).where(_TENANT.c.id == tenant_id).values(**values))


def _record_invoice(session: Session, invoice_id: str, stripe_id: str, items: dict[int, str]) -> None:
    invoice = session.get(Invoice, invoice_id)
    assert invoice is not None
    invoice.stripe_invoice_id, invoice.sync_status = stripe_id, "synced"
    session.add(invoice)
    for line in session.exec(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id)).all():
        line.stripe_invoice_item_id = items.get(line.position) or line.stripe_invoice_item_id
        session.add(line)


def _set_invoice_sync(session: Session, row: StripeOutbox, status: str) -> None:
    if row.kind == "invoice":
        session.exec(update(Invoice).where(col(Invoice.id) == row.object_id).values(sync_status=status))


def _invoice_metadata(invoice: Invoice) -> dict[str, str]:
    return {"mm_invoice_id": invoice.id, "tenant_id": invoice.tenant_id, "period": invoice.period}


def _line_metadata(invoice: Invoice, line: InvoiceLine) -> dict[str, str]:
    return {"mm_invoice_id": invoice.id, "mm_line": str(line.position), "code": line.code, "plan": line.plan,
            "quantity": str(line.quantity), "unit_amount_decimal": line.unit_amount_decimal}


def _meta(obj: Any) -> dict[str, str]:
    metadata = getattr(obj, "metadata", None)
    return metadata.to_dict() if isinstance(metadata, stripe.StripeObject) else dict(metadata or {})


def _item_id(line: Any) -> str:
    """The invoice item behind an invoice line (older API versions and emulators name it at the top level)."""
    direct = getattr(line, "invoice_item", None)
    if direct:
        return str(direct)
    details = getattr(getattr(line, "parent", None), "invoice_item_details", None)
    return str(getattr(details, "invoice_item", "") or "")


def _retrieve_or_create(retrieve: Callable[[], T], create: Callable[[], T]) -> T:
    try:
        return retrieve()
    except stripe.InvalidRequestError as exc:
        if exc.http_status != 404:
            raise
    return create()


def suspend_overdue(session: Session, *, now: int, grace_s: int, tenant_id: str | None = None) -> list[str]:
    """Suspend active tenants past due for longer than ``grace_s``; returns their ids (caller commits)."""
    query = select(_TENANT.c.id).where(
        _TENANT.c.billing_status == "past_due", _TENANT.c.status == "active",
        _TENANT.c.past_due_since <= now - grace_s,
    )
    if tenant_id is not None:
        query = query.where(_TENANT.c.id == tenant_id)
    ids = [str(i) for i in session.exec(query).all()]
    if ids:
        session.exec(update(_TENANT).where(_TENANT.c.id.in_(ids))
                     .values(status="suspended", suspension_reason="past_due", updated=now))
        log.warning("suspended %d tenant(s) past due beyond %d s: %s", len(ids), grace_s, ", ".join(ids))
    return ids


# --- webhooks ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventResult:
    """What a webhook event did: ``tenant_id`` is set when it touched a tenant (whose auth cache must go)."""

    outcome: str  # applied | stale | superseded | ignored | duplicate | unknown_customer | unhandled
    tenant_id: str | None = None

    def public(self) -> dict[str, Any]:
        return {"received": True, "outcome": self.outcome}


def verify_event(payload: bytes, signature: str | None, secret: str, *, tolerance: int = 300) -> dict[str, Any]:
    """Check Stripe's signature on the raw body and return the event.

    Raises ``stripe.SignatureVerificationError`` (bad, missing or stale signature) or ``ValueError`` (not an event).
    """
    stripe.Webhook.construct_event(payload, signature, secret, tolerance=tolerance)
    event = json.loads(payload)
    if not (isinstance(event, dict) and isinstance(event.get("id"), str) and isinstance(event.get("type"), str)
            and isinstance(event.get("data"), dict) and isinstance(event["data"].get("object"), dict)):
        raise ValueError("not a Stripe event")
    return event


EventHandler = Callable[[Session, str, dict[str, Any], int], str]


def handle_event(*, session: Session, event: dict[str, Any], now: int, grace_s: int) -> EventResult:
    """Apply a verified event once (the caller commits; a concurrent duplicate fails on the event's primary key).

    The tenant row is locked first, so concurrent events of one tenant apply one after the other.
    """
    if session.get(StripeEvent, event["id"]) is not None:
        return EventResult("duplicate")
    handler = _EVENT_HANDLERS.get(event["type"])
    if handler is None:
        return EventResult("unhandled")
    obj, created = event["data"]["object"], int(event.get("created") or now)
    tenant_id = _tenant_of_invoice(session, obj) if event["type"].startswith("invoice.") else \
        _tenant_of_subscription(session, obj)
    if tenant_id is None:
        log.warning("Stripe event %s (%s) names no tenant of ours (customer %s): ignored", event["id"],
                    event["type"], obj.get("customer"))
        return EventResult("unknown_customer")
    _lock_tenant(session, tenant_id)
    outcome = handler(session, tenant_id, obj, created)
    refresh_billing(session, tenant_id, now=now, grace_s=grace_s)
    session.add(StripeEvent(id=event["id"], type=event["type"], created=created, received_at=now,
                            tenant_id=tenant_id, object_id=obj.get("id"), outcome=outcome))
    session.flush()
    return EventResult(outcome, tenant_id)


def refresh_billing(session: Session, tenant_id: str, *, now: int, grace_s: int) -> None:
    """Derive ``billing_status``/``past_due_since`` from the tenant's unpaid failed invoices; apply the grace period.

    A tenant suspended for non-payment is reactivated once nothing is past due.
    """
    since = session.exec(select(func.min(Invoice.payment_failed_at)).where(
        Invoice.tenant_id == tenant_id, col(Invoice.payment_failed_at).is_not(None),
        col(Invoice.status).not_in(("paid", "void")))).one()
    status, reason, billing, was_since = session.exec(
        select(_TENANT.c.status, _TENANT.c.suspension_reason, _TENANT.c.billing_status, _TENANT.c.past_due_since)
        .where(_TENANT.c.id == tenant_id)).one()
    values: dict[str, Any] = {}
    if (billing, was_since) != ("past_due" if since else "ok", since):
        values |= {"billing_status": "past_due" if since else "ok", "past_due_since": since}
    if since is None and status == "suspended" and reason == "past_due":
        values |= {"status": "active", "suspension_reason": None}
    if values:
        session.exec(update(_TENANT).where(_TENANT.c.id == tenant_id).values(**values, updated=now))
    suspend_overdue(session, now=now, grace_s=grace_s, tenant_id=tenant_id)


def _lock_tenant(session: Session, tenant_id: str) -> None:
    query = select(_TENANT.c.id).where(_TENANT.c.id == tenant_id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    session.exec(query).one()


def _invoice_match(obj: dict[str, Any]) -> ColumnElement[bool]:
    """Our invoice named by the Stripe invoice: its ``mm_invoice_id`` metadata, or the Stripe id we recorded."""
    ours, theirs = (obj.get("metadata") or {}).get("mm_invoice_id"), obj.get("id")
    conditions = [col(Invoice.id) == ours] if isinstance(ours, str) else []
    conditions += [col(Invoice.stripe_invoice_id) == theirs] if isinstance(theirs, str) else []
    return or_(false(), *conditions)


def _tenant_of_invoice(session: Session, obj: dict[str, Any]) -> str | None:
    found = session.exec(select(Invoice.tenant_id).where(_invoice_match(obj)).limit(1)).first()
    return found if found is not None else _tenant_of_customer(session, obj.get("customer"))


def _our_invoice(session: Session, tenant_id: str, obj: dict[str, Any]) -> Invoice | None:
    query = select(Invoice).where(_invoice_match(obj), Invoice.tenant_id == tenant_id)
    return session.exec(query.limit(1)).first()


def _tenant_of_customer(session: Session, customer: Any) -> str | None:
    if not isinstance(customer, str):
        return None
    found = session.exec(select(_TENANT.c.id).where(_TENANT.c.stripe_customer_id == customer)).first()
    return None if found is None else str(found)


def _on_invoice_paid(session: Session, tenant_id: str, obj: dict[str, Any], created: int) -> str:
    invoice = _our_invoice(session, tenant_id, obj)
    if invoice is None:
        return "ignored"  # an invoice of a known customer that we did not make
    paid_at = int((obj.get("status_transitions") or {}).get("paid_at") or created)
    invoice.status = "paid"
    invoice.paid_at = paid_at if invoice.paid_at is None else min(invoice.paid_at, paid_at)
    invoice.stripe_invoice_id = invoice.stripe_invoice_id or obj.get("id")
    session.add(invoice)
    return "applied"


def _on_payment_failed(session: Session, tenant_id: str, obj: dict[str, Any], created: int) -> str:
    invoice = _our_invoice(session, tenant_id, obj)
    if invoice is None:
        return "ignored"
    # Recorded even on a paid invoice (so the state does not depend on arrival order); only unpaid ones count.
    failed = invoice.payment_failed_at
    invoice.payment_failed_at = created if failed is None else min(failed, created)
    session.add(invoice)
    return "stale" if invoice.status in ("paid", "void") else "applied"


def _on_subscription_deleted(session: Session, tenant_id: str, obj: dict[str, Any], created: int) -> str:
    if not _is_current_subscription(session, tenant_id, obj):
        return "superseded"  # one we replaced on a plan change
    status = session.exec(select(_TENANT.c.status).where(_TENANT.c.id == tenant_id)).one()
    values: dict[str, Any] = {"stripe_subscription_id": None}
    if status == "active":
        values |= {"status": "suspended", "suspension_reason": "subscription_deleted", "updated": clock.now_s()}
    session.exec(update(_TENANT).where(_TENANT.c.id == tenant_id).values(**values))
    return "applied"


def _tenant_of_subscription(session: Session, obj: dict[str, Any]) -> str | None:
    named = (obj.get("metadata") or {}).get("tenant_id")
    if isinstance(named, str) and session.exec(select(_TENANT.c.id).where(_TENANT.c.id == named)).first():
        return named
    return _tenant_of_customer(session, obj.get("customer"))


def _is_current_subscription(session: Session, tenant_id: str, obj: dict[str, Any]) -> bool:
    change_id = (obj.get("metadata") or {}).get("mm_change_id")
    if change_id is not None:
        latest = session.exec(select(func.max(PlanChange.id)).where(PlanChange.tenant_id == tenant_id)).one()
        return str(latest) == str(change_id)
    stored = session.exec(select(_TENANT.c.stripe_subscription_id).where(_TENANT.c.id == tenant_id)).one()
    return stored is not None and stored == obj.get("id")


_EVENT_HANDLERS: dict[str, EventHandler] = {
    "invoice.paid": _on_invoice_paid,
    "invoice.payment_failed": _on_payment_failed,
    "customer.subscription.deleted": _on_subscription_deleted,
}

HANDLED_EVENTS = tuple(_EVENT_HANDLERS)  # the event types to enable on the Stripe webhook endpoint
