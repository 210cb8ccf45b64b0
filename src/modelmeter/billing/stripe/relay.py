"""The relay: sends the outbox to Stripe, one lease-protected row at a time, and enforces the past-due grace period.

A row is leased by compare-and-set (two relays never send the same row at once); one tenant's rows go in ``id``
order; network and server errors retry forever with exponential backoff, other errors ``max_attempts`` times, then
the row is ``failed`` until an operator requeues it. What each row sends is :mod:`modelmeter.billing.stripe.mirror`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import stripe
from sqlalchemy import or_, update
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.stripe.client import PermanentSyncError, make_client, retryable
from modelmeter.billing.stripe.dunning import suspend_overdue
from modelmeter.billing.stripe.mirror import Sent, StripeMirror
from modelmeter.billing.stripe.outbox import enable_outbox
from modelmeter.billing.tables import Invoice, StripeOutbox
from modelmeter.db import claim_due
from modelmeter.periodic import Periodic
from modelmeter.settings import Settings
from modelmeter.shapes import Public

log = logging.getLogger("modelmeter.stripe")

LEASE_S = 300
BACKOFF_BASE_S = 2
BACKOFF_CAP_S = 3600


def relay_from_settings(settings: Settings, *, sessions: sessionmaker[Session], catalog: PlanCatalog,
                        on_suspend: Callable[[str], None] | None = None) -> StripeRelay | None:
    """The relay when a Stripe key is configured (and the outbox switched on for ``sessions``), else ``None``."""
    if not settings.stripe_api_key:
        return None
    client, close = make_client(settings)
    enable_outbox(sessions)
    return StripeRelay(client=client, sessions=sessions, catalog=catalog, max_attempts=settings.stripe_max_attempts,
                       grace_s=settings.past_due_grace_s, on_suspend=on_suspend, on_close=close)


@dataclass(frozen=True)
class RowOutcome:
    id: int
    kind: str
    object_id: str
    result: str  # done | retry | failed
    stripe_id: str | None = None
    error: str | None = None


class StripeSync(Public):
    """``modelmeter billing sync --json``: what one pass sent, what waits for a retry, what gave up."""

    object: Literal["stripe_sync"]
    sent: int
    retrying: int
    failed: int
    suspended: list[str]
    rows: list[dict[str, Any]]

    @classmethod
    def of(cls, report: RelayReport) -> StripeSync:
        return cls(object="stripe_sync", sent=report.count("done"), retrying=report.count("retry"),
                   failed=report.count("failed"), suspended=report.suspended,
                   rows=[dataclasses.asdict(row) for row in report.rows])


@dataclass
class RelayReport:
    """What one pass of the relay did."""

    rows: list[RowOutcome] = field(default_factory=list)
    suspended: list[str] = field(default_factory=list)

    def count(self, result: str) -> int:
        return sum(1 for row in self.rows if row.result == result)


    def summary(self) -> str:
        lines = [f"{r.kind:<12} {r.object_id:<40} {r.result:<6} {r.stripe_id or r.error or ''}" for r in self.rows]
        lines += [f"suspended    {tenant_id:<40} past due beyond the grace period" for tenant_id in self.suspended]
        totals = f"sent {self.count('done')}, retrying {self.count('retry')}, failed {self.count('failed')}"
        return "\n".join([*lines, totals])


def backoff_s(attempts: int) -> int:
    """Seconds before attempt ``attempts + 1``: 2, 4, 8, ... capped at an hour."""
    return int(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


class StripeRelay(StripeMirror):
    """Sends the outbox to Stripe, one lease-protected row at a time, and enforces the past-due grace period."""

    def __init__(self, *, client: stripe.StripeClient, sessions: sessionmaker[Session], catalog: PlanCatalog,
                 max_attempts: int = 10, grace_s: int = 7 * 24 * 3600, lease_s: int = LEASE_S, batch: int = 100,
                 on_suspend: Callable[[str], None] | None = None, on_close: Callable[[], None] | None = None) -> None:
        super().__init__(client=client, sessions=sessions, catalog=catalog)
        self._max_attempts = max_attempts
        self._grace_s = grace_s
        self._lease_s = lease_s
        self._batch = batch
        self._on_suspend = on_suspend or (lambda _tenant_id: None)
        self._on_close = on_close
        self._handlers: dict[str, Callable[[StripeOutbox], Sent]] = {
            "customer": self._send_customer, "subscription": self._send_subscription, "invoice": self._send_invoice,
            "credit_purchase": self._send_credit_purchase,
        }
        self._tick_lock = threading.Lock()
        self._loop = Periodic(self.tick, name="Stripe sync")

    # lifecycle

    def start(self, interval_s: float) -> None:  # float-ok: seconds
        """Run a pass every ``interval_s`` seconds in a worker thread until ``aclose`` (call from the event loop)."""
        self._loop.start(interval_s)

    async def aclose(self) -> None:
        """Stop the loop after the pass in flight, then close the client's connections."""
        await self._loop.stop()
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
        while not self._loop.stopping:
            due = self._due()
            if self._pass(due, report) == 0 or len(due) < self._batch:
                return report
        return report

    def _pass(self, rows: list[StripeOutbox], report: RelayReport) -> int:
        blocked: set[str] = set()
        sent = 0
        for row in rows:
            if self._loop.stopping:
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
                _set_invoice_sync(session=session, row=row, status="pending")
            session.commit()
            return len(rows)

    def enforce_grace(self) -> list[str]:
        """Suspend tenants that have been past due longer than the grace period."""
        with self._sessions() as session:
            suspended = suspend_overdue(session=session, now=clock.now_s(), grace_s=self._grace_s)
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
        """Lease a due row (``db.claim_due``: two relays never send the same row at once)."""
        claimed = claim_due(self._sessions, StripeOutbox, row.id, now=clock.now_s(), lease_s=self._lease_s)
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
                _set_invoice_sync(session=session, row=row, status="failed")
            session.commit()
        return RowOutcome(row.id, row.kind, row.object_id, "failed" if give_up else "retry", error=error)


def _set_invoice_sync(*, session: Session, row: StripeOutbox, status: str) -> None:
    if row.kind == "invoice":
        session.exec(update(Invoice).where(col(Invoice.id) == row.object_id).values(sync_status=status))
