"""The alert relay: POSTs each pending delivery's event to the tenant's URL, signed, until a 2xx comes back.

A row is leased by compare-and-set (two gateways never send the same row at once); a failure (non-2xx, timeout,
connection error) is retried with exponential backoff, up to ``max_attempts``, then the row is ``failed`` (the
``modelmeter_alert_deliveries_failed`` gauge and ``GET /admin/events/deliveries?status=failed`` show it). Every
attempt sends the same event, same id: receivers deduplicate on it. The body is signed as Stripe signs webhooks:
``modelmeter-signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the tenant's secret>``.

A receiver is the tenant's and hostile (issue 21): it may answer gigabytes, gzip bombs, or drip its headers a byte
at a time. An attempt is bounded before it starts: the connection goes to the address that was checked
(``destinations.pin``: no second DNS lookup), ``accept-encoding: identity`` is asked, only the status line and
headers are read (h11 caps them at 64 KiB) and never the body (the stream is closed unread), and the whole attempt,
connect to headers, has one wall-clock deadline (``timeout_s``). Each query round takes at most one due delivery
per tenant, oldest first, so a tenant with thousands of pending deliveries to a slow receiver delays another
tenant's by at most one attempt per round.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass, field

import httpx
from sqlalchemy import func, or_
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing.alerts import EventPublic
from modelmeter.billing.destinations import pin
from modelmeter.billing.tables import AlertDelivery, AlertEvent, AlertSetting
from modelmeter.db import claim_due
from modelmeter.periodic import Periodic
from modelmeter.sealing import Sealer

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
                 transport: httpx.AsyncBaseTransport | None = None, allow_private: bool = False,
                 sealer: Sealer | None = None) -> None:
        self._sessions = sessions
        self._sealer = sealer  # opens the tenants' sealed signing secrets (``alerts.secret_sealer``)
        self._allow_private = allow_private
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._lease_s = max(lease_s, int(timeout_s) + 1)
        self._batch = batch
        self._timeout_s = timeout_s
        self._transport = transport
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
        """The oldest due delivery of each tenant (up to ``batch`` tenants), oldest first."""
        now = clock.now_s()
        ranked = (select(col(AlertDelivery.id).label("id"), func.row_number().over(
                      partition_by=col(AlertDelivery.tenant_id), order_by=col(AlertDelivery.id)).label("rank"))
                  .where(AlertDelivery.status == "pending", col(AlertDelivery.next_attempt_at) <= now,
                         or_(col(AlertDelivery.locked_until).is_(None), col(AlertDelivery.locked_until) <= now))
                  .subquery())
        query = (select(AlertDelivery).join(ranked, col(AlertDelivery.id) == ranked.c.id)
                 .where(ranked.c.rank == 1).order_by(col(AlertDelivery.id)).limit(self._batch))
        with self._sessions() as session:
            return list(session.exec(query).all())

    def _claim(self, row: AlertDelivery) -> bool:
        """Lease a due row (``db.claim_due``: two relays never send the same row at once)."""
        claimed = claim_due(self._sessions, AlertDelivery, row.id, now=clock.now_s(), lease_s=self._lease_s)
        if claimed:
            row.attempts += 1
        return claimed

    def _body(self, row: AlertDelivery) -> tuple[bytes, str]:
        with self._sessions() as session:
            event = session.get(AlertEvent, row.event_id)
            setting = session.get(AlertSetting, row.tenant_id)
            assert event is not None
            if setting is None:
                raise LookupError("the tenant's alert settings are gone")
            if self._sealer is None:
                raise LookupError("this relay has no sealer to open the tenant's signing secret")
            secret = self._sealer.open_text(setting.secret, row.tenant_id)
            return EventPublic.of(event).model_dump_json().encode(), secret

    def _send(self, row: AlertDelivery) -> DeliveryOutcome:
        assert row.id is not None
        status: int | None = None
        error: str | None = None
        try:
            body, secret = self._body(row)
            status = asyncio.run(asyncio.wait_for(self._post(row.url, body, secret), self._timeout_s))
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except TimeoutError:
            error = f"no answer within {self._timeout_s:g} s"
        except Exception as exc:  # refused connections, bad URLs, private addresses: all retried
            error = f"{type(exc).__name__}: {exc}"[:1000]
        return self._finish(row, status, error)

    async def _post(self, url: str, body: bytes, secret: str) -> int:
        """One attempt: the status of the receiver's answer, whose body is never read."""
        target = await pin(url, allow_private=self._allow_private)
        headers = {"host": target.host, "content-type": "application/json", "accept-encoding": "identity",
                   "user-agent": "modelmeter-alerts/1", SIGNATURE_HEADER: sign(secret, clock.now_s(), body)}
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
        async with (
            httpx.AsyncClient(timeout=self._timeout_s, transport=self._transport, follow_redirects=False,
                              trust_env=False) as client,
            client.stream("POST", target.connect_url, content=body, headers=headers, extensions=extensions,
                          auth=httpx.BasicAuth(*target.credentials) if target.credentials else None) as response,
        ):
            return response.status_code  # closing the stream unread drops the connection

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
