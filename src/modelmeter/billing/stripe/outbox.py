"""Writing the Stripe outbox: one row per Stripe mutation, in the transaction of the change that causes it.

Rows are written only when Stripe is configured (``enable_outbox`` on the sessionmaker); each carries a
deterministic idempotency key, saved with the row before any call is made. The relay sends them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter import clock
from modelmeter.billing.tables import CreditPurchase, Invoice, PlanChange, StripeOutbox

OUTBOX_FLAG = "stripe_outbox"


def idempotency_key(kind: str, object_id: str) -> str:
    """The deterministic key of one Stripe mutation, saved with the row before the call."""
    return f"mm-{kind}-{object_id}"


def enable_outbox(sessions: sessionmaker[Session]) -> None:
    """Make the data functions of every session from ``sessions`` write Stripe outbox rows."""
    sessions.configure(info={**sessions.kw.get("info", {}), OUTBOX_FLAG: True})


def outbox_enabled(*, session: Session) -> bool:
    return bool(session.info.get(OUTBOX_FLAG))


def _enqueue(*, session: Session, kind: str, object_id: str, tenant_id: str, payload: dict[str, Any]) -> bool:
    if not outbox_enabled(session=session):
        return False
    now = clock.now_s()
    session.add(StripeOutbox(kind=kind, object_id=object_id, tenant_id=tenant_id, payload=payload,
                             idempotency_key=idempotency_key(kind, object_id), next_attempt_at=now, created=now))
    return True


def enqueue_customer(*, session: Session, tenant_id: str, email: str, name: str) -> None:
    """Queue the tenant's Customer (in the transaction that creates the tenant)."""
    _enqueue(session=session, kind="customer", object_id=tenant_id, tenant_id=tenant_id,
             payload={"email": email, "name": name})


def enqueue_plan_change(*, session: Session, change: PlanChange) -> None:
    """Queue the subscription to the tenant's new plan (in the transaction that records the change)."""
    if not outbox_enabled(session=session):
        return
    session.flush()  # the change's id names the subscription
    _enqueue(session=session, kind="subscription", object_id=f"{change.tenant_id}-{change.id}",
             tenant_id=change.tenant_id, payload={"plan": change.plan, "change_id": change.id})


def enqueue_invoice(*, session: Session, invoice: Invoice, has_lines: bool) -> None:
    """Queue a closed invoice (in the closing transaction); an invoice without lines has nothing to send."""
    if has_lines and _enqueue(session=session, kind="invoice", object_id=invoice.id, tenant_id=invoice.tenant_id,
                              payload={"period": invoice.period, "total": invoice.total}):
        invoice.sync_status = "pending"
        session.add(invoice)


def enqueue_credit_purchase(*, session: Session, purchase: CreditPurchase) -> bool:
    """Queue a top-up's Stripe invoice (in the transaction that records the purchase); False without Stripe."""
    return _enqueue(session=session, kind="credit_purchase", object_id=purchase.id, tenant_id=purchase.tenant_id,
                    payload={"amount_cents": purchase.amount_cents, "currency": purchase.currency})
