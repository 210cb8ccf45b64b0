"""The alert relay: POSTs each pending delivery's event to the tenant's URL, signed, until a 2xx comes back.

A row is leased by compare-and-set (two gateways never send the same row at once); a failure (non-2xx, timeout,
connection error) is retried with exponential backoff, up to ``max_attempts``, then the row is ``failed`` (the
``modelmeter_alert_deliveries_failed`` gauge and ``GET /admin/events/deliveries?status=failed`` show it). Every
attempt sends the same event, same id: receivers deduplicate on it. The body is signed as Stripe signs webhooks:
``modelmeter-signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the tenant's secret>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import dataclass, field

import httpx
from sqlalchemy import or_, update
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing.alerts import event_public, private_address
from modelmeter.billing.tables import AlertDelivery, AlertEvent, AlertSetting
from modelmeter.periodic import Periodic

log = logging.getLogger("modelmeter.alerts")

SIGNATURE_HEADER = "modelmeter-signature"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@dataclass(frozen=True)
class DeliveryOutcome:
    id: int
    event_id: str
    result: str  # done | retry | failed
    status: int | None = None
    error: str | None = None


@dataclass
class DeliveryReport:
    rows: list[DeliveryOutcome] = field(default_factory=list)

    def count(self, result: str) -> int:
        return sum(1 for row in self.rows if row.result == result)


class AlertRelay:
    """Sends due deliveries; ``run_once`` is one pass (tests call it on a fake clock), ``start`` loops."""

    def __init__(self, *, sessions: sessionmaker[Session], max_attempts: int = 8,
                 timeout_s: float = 5.0,  # float-ok: seconds
                 backoff_base_s: int = 2, backoff_cap_s: int = 3600, lease_s: int = 60, batch: int = 100,
                 transport: httpx.BaseTransport | None = None, allow_private: bool = False) -> None:
        self._sessions = sessions
        self._allow_private = allow_private
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._lease_s = max(lease_s, int(timeout_s) + 1)
        self._batch = batch
        self._client = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False,
                                    headers={"user-agent": "modelmeter-alerts/1"})
        self._lock = threading.Lock()
        self._loop = Periodic(self.run_once, name="alert delivery pass")

    def backoff_s(self, attempts: int) -> int:
        """Seconds before attempt ``attempts + 1``: base, 2 base, 4 base, ... capped."""
        return int(min(self._backoff_cap_s, self._backoff_base_s * 2 ** max(0, attempts - 1)))

    # lifecycle

    def start(self, interval_s: float) -> None:  # float-ok: seconds
        """Run a pass every ``interval_s`` seconds in a worker thread until ``aclose`` (call from the event loop)."""
        self._loop.start(interval_s)

    async def aclose(self) -> None:
        """Stop the loop after the pass in flight, then close the client's connections."""
        await self._loop.stop()
        self._client.close()

    # one pass

    def run_once(self) -> DeliveryReport:
        """Send every due delivery once (in batches while batches fill)."""
        report = DeliveryReport()
        with self._lock:
            while not self._loop.stopping:
                due = self._due()
                for row in due:
                    if self._loop.stopping:
                        break
                    if self._claim(row):
                        report.rows.append(self._send(row))
                if len(due) < self._batch:
                    break
        return report

    def _due(self) -> list[AlertDelivery]:
        now = clock.now_s()
        query = (select(AlertDelivery)
                 .where(AlertDelivery.status == "pending", col(AlertDelivery.next_attempt_at) <= now,
                        or_(col(AlertDelivery.locked_until).is_(None), col(AlertDelivery.locked_until) <= now))
                 .order_by(col(AlertDelivery.id)).limit(self._batch))
        with self._sessions() as session:
            return list(session.exec(query).all())

    def _claim(self, row: AlertDelivery) -> bool:
        now = clock.now_s()
        statement = (
            update(AlertDelivery)
            .where(col(AlertDelivery.id) == row.id, col(AlertDelivery.status) == "pending",
                   col(AlertDelivery.next_attempt_at) <= now,
                   or_(col(AlertDelivery.locked_until).is_(None), col(AlertDelivery.locked_until) <= now))
            .values(locked_until=now + self._lease_s, attempts=col(AlertDelivery.attempts) + 1)
        )
        with self._sessions() as session:
            claimed = session.exec(statement).rowcount == 1
            session.commit()
        if claimed:
            row.attempts += 1
        return claimed

    def _body(self, row: AlertDelivery) -> tuple[bytes, str]:
        with self._sessions() as session:
            event = session.get(AlertEvent, row.event_id)
            setting = session.get(AlertSetting, row.tenant_id)
            assert event is not None
            secret = setting.secret if setting is not None else ""
            return json.dumps(event_public(event), separators=(",", ":")).encode(), secret

    def _send(self, row: AlertDelivery) -> DeliveryOutcome:
        assert row.id is not None
        status: int | None = None
        error: str | None = None
        try:
            if not self._allow_private and private_address(row.url, resolve=True):
                raise PermissionError("the URL resolves to a loopback, private or link-local address: not sent")
            body, secret = self._body(row)
            timestamp = clock.now_s()
            response = self._client.post(row.url, content=body, headers={
                "content-type": "application/json", SIGNATURE_HEADER: sign(secret, timestamp, body)})
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except Exception as exc:  # timeouts, refused connections, bad URLs: all retried
            error = f"{type(exc).__name__}: {exc}"[:1000]
        return self._finish(row, status, error)

    def _finish(self, row: AlertDelivery, status: int | None, error: str | None) -> DeliveryOutcome:
        assert row.id is not None
        now = clock.now_s()
        give_up = error is not None and row.attempts >= self._max_attempts
        result = "done" if error is None else "failed" if give_up else "retry"
        if error is not None:
            log.warning("alert delivery %d of %s to %s failed (attempt %d%s): %s", row.id, row.event_id, row.url,
                        row.attempts, ", giving up" if give_up else "", error)
        with self._sessions() as session:
            stored = session.get(AlertDelivery, row.id)
            assert stored is not None
            stored.status = {"done": "done", "failed": "failed", "retry": "pending"}[result]
            stored.locked_until, stored.last_status, stored.last_error = None, status, error
            if result == "done":
                stored.done_at = now
            else:
                stored.next_attempt_at = now + self.backoff_s(row.attempts)
            session.add(stored)
            session.commit()
        return DeliveryOutcome(row.id, row.event_id, result, status, error)

    def requeue_failed(self) -> int:
        """Give every ``failed`` delivery a fresh start (after the receiver is fixed)."""
        with self._sessions() as session:
            rows = session.exec(select(AlertDelivery).where(AlertDelivery.status == "failed")).all()
            for row in rows:
                row.status, row.attempts, row.next_attempt_at = "pending", 0, clock.now_s()
                session.add(row)
            session.commit()
            return len(rows)
