"""Stripe webhook events: the signature check on the raw body, and each handled event applied once.

The state an event leaves is a function of the set of events received, not of their order: ``paid`` is final, a
payment failure only records its earliest time, and the tenant's billing status is derived afresh
(:func:`modelmeter.billing.stripe.dunning.refresh_billing`) after every event. An invoice is either one of our
period invoices or the invoice of a credit purchase (``metadata.mm_purchase_id``), whose ``invoice.paid`` grants the
credits once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import stripe
from sqlalchemy import ColumnElement, false, func, or_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select, update

from modelmeter import clock
from modelmeter.billing import credits
from modelmeter.billing.stripe.dunning import refresh_billing
from modelmeter.billing.tables import CreditPurchase, Invoice, PlanChange, StripeEvent
from modelmeter.shapes import Public
from modelmeter.tenancy.tenants import Tenant, lock_tenant

log = logging.getLogger("modelmeter.stripe")


@dataclass(frozen=True)
class EventResult:
    """What a webhook event did: ``tenant_id`` is set when it touched a tenant (whose auth cache must go)."""

    outcome: str  # applied | stale | superseded | ignored | duplicate | unknown_customer | unhandled
    tenant_id: str | None = None



class WebhookReceipt(Public):
    """The answer to Stripe: the event was received and what it did."""

    received: bool
    outcome: str

    @classmethod
    def of(cls, result: EventResult) -> WebhookReceipt:
        return cls(received=True, outcome=result.outcome)


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


class EventHandler(Protocol):
    """Applies one event's object to a (locked) tenant; returns the outcome."""

    def __call__(self, *, session: Session, tenant_id: str, obj: dict[str, Any], created: int) -> str: ...


def apply_event(*, sessions: sessionmaker[Session], event: dict[str, Any], now: int, grace_s: int) -> EventResult:
    """Apply a verified event once, in its own transaction; the same event delivered twice at once is applied by
    one delivery and reported as ``duplicate`` to the other."""
    with sessions() as session:
        try:
            result = handle_event(session=session, event=event, now=now, grace_s=grace_s)
            session.commit()
        except IntegrityError:
            session.rollback()
            return EventResult("duplicate")
        return result


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
    tenant_id = _tenant_of_invoice(session=session, obj=obj) if event["type"].startswith("invoice.") else \
        _tenant_of_subscription(session=session, obj=obj)
    if tenant_id is None:
        log.warning("Stripe event %s (%s) names no tenant of ours (customer %s): ignored", event["id"],
                    event["type"], obj.get("customer"))
        return EventResult("unknown_customer")
    lock_tenant(session=session, tenant_id=tenant_id)
    outcome = handler(session=session, tenant_id=tenant_id, obj=obj, created=created)
    refresh_billing(session=session, tenant_id=tenant_id, now=now, grace_s=grace_s)
    session.add(StripeEvent(id=event["id"], type=event["type"], created=created, received_at=now,
                            tenant_id=tenant_id, object_id=obj.get("id"), outcome=outcome))
    session.flush()
    return EventResult(outcome, tenant_id)


# --- whose event ------------------------------------------------------------------------------------------------


def _invoice_match(obj: dict[str, Any]) -> ColumnElement[bool]:
    """Our invoice named by the Stripe invoice: its ``mm_invoice_id`` metadata, or the Stripe id we recorded."""
    ours, theirs = (obj.get("metadata") or {}).get("mm_invoice_id"), obj.get("id")
    conditions = [col(Invoice.id) == ours] if isinstance(ours, str) else []
    conditions += [col(Invoice.stripe_invoice_id) == theirs] if isinstance(theirs, str) else []
    return or_(false(), *conditions)


def _purchase_match(obj: dict[str, Any]) -> ColumnElement[bool]:
    """The credit purchase named by the Stripe invoice: its ``mm_purchase_id`` metadata, or the id we recorded."""
    ours, theirs = (obj.get("metadata") or {}).get("mm_purchase_id"), obj.get("id")
    conditions = [col(CreditPurchase.id) == ours] if isinstance(ours, str) else []
    conditions += [col(CreditPurchase.stripe_invoice_id) == theirs] if isinstance(theirs, str) else []
    return or_(false(), *conditions)


def _tenant_of_invoice(*, session: Session, obj: dict[str, Any]) -> str | None:
    found = session.exec(select(Invoice.tenant_id).where(_invoice_match(obj)).limit(1)).first()
    if found is None:
        found = session.exec(select(CreditPurchase.tenant_id).where(_purchase_match(obj)).limit(1)).first()
    return found if found is not None else _tenant_of_customer(session=session, customer=obj.get("customer"))


def _our_invoice(*, session: Session, tenant_id: str, obj: dict[str, Any]) -> Invoice | None:
    query = select(Invoice).where(_invoice_match(obj), Invoice.tenant_id == tenant_id)
    return session.exec(query.limit(1)).first()


def _our_purchase(*, session: Session, tenant_id: str, obj: dict[str, Any]) -> CreditPurchase | None:
    """The purchase the Stripe invoice pays, read after the tenant is locked (so a concurrent grant is seen)."""
    query = select(CreditPurchase).where(_purchase_match(obj), CreditPurchase.tenant_id == tenant_id)
    return session.exec(query.limit(1)).first()


def _tenant_of_customer(*, session: Session, customer: Any) -> str | None:
    if not isinstance(customer, str):
        return None
    return session.exec(select(Tenant.id).where(Tenant.stripe_customer_id == customer)).first()


def _tenant_of_subscription(*, session: Session, obj: dict[str, Any]) -> str | None:
    named = (obj.get("metadata") or {}).get("tenant_id")
    if isinstance(named, str) and session.exec(select(Tenant.id).where(Tenant.id == named)).first():
        return named
    return _tenant_of_customer(session=session, customer=obj.get("customer"))


def _is_current_subscription(*, session: Session, tenant_id: str, obj: dict[str, Any]) -> bool:
    change_id = (obj.get("metadata") or {}).get("mm_change_id")
    if change_id is not None:
        latest = session.exec(select(func.max(PlanChange.id)).where(PlanChange.tenant_id == tenant_id)).one()
        return str(latest) == str(change_id)
    stored = session.exec(select(Tenant.stripe_subscription_id).where(Tenant.id == tenant_id)).one()
    return stored is not None and stored == obj.get("id")


# --- the events -------------------------------------------------------------------------------------------------


def _on_invoice_paid(*, session: Session, tenant_id: str, obj: dict[str, Any], created: int) -> str:
    paid_at = int((obj.get("status_transitions") or {}).get("paid_at") or created)
    invoice = _our_invoice(session=session, tenant_id=tenant_id, obj=obj)
    if invoice is None:
        purchase = _our_purchase(session=session, tenant_id=tenant_id, obj=obj)
        if purchase is None:
            return "ignored"  # an invoice of a known customer that we did not make
        granted = credits.mark_paid(session=session, purchase=purchase, paid_at=paid_at,
                                    stripe_invoice_id=obj.get("id"))
        return "applied" if granted else "duplicate"  # another event already reported this payment
    invoice.status = "paid"
    invoice.paid_at = paid_at if invoice.paid_at is None else min(invoice.paid_at, paid_at)
    invoice.stripe_invoice_id = invoice.stripe_invoice_id or obj.get("id")
    session.add(invoice)
    return "applied"


def _on_payment_failed(*, session: Session, tenant_id: str, obj: dict[str, Any], created: int) -> str:
    invoice = _our_invoice(session=session, tenant_id=tenant_id, obj=obj)
    if invoice is None:
        # Not ours, or a credit purchase: a failed top-up grants nothing, stays pending (Stripe retries it) and,
        # being no debt, never makes the tenant past due.
        return "ignored"
    # Recorded even on a paid invoice (so the state does not depend on arrival order); only unpaid ones count.
    failed = invoice.payment_failed_at
    invoice.payment_failed_at = created if failed is None else min(failed, created)
    session.add(invoice)
    return "stale" if invoice.status in ("paid", "void") else "applied"


def _on_subscription_deleted(*, session: Session, tenant_id: str, obj: dict[str, Any], created: int) -> str:
    if not _is_current_subscription(session=session, tenant_id=tenant_id, obj=obj):
        return "superseded"  # one we replaced on a plan change
    status = session.exec(select(Tenant.status).where(Tenant.id == tenant_id)).one()
    values: dict[str, Any] = {"stripe_subscription_id": None}
    if status == "active":
        values |= {"status": "suspended", "suspension_reason": "subscription_deleted", "updated": clock.now_s()}
    session.exec(update(Tenant).where(col(Tenant.id) == tenant_id).values(**values))
    return "applied"


_EVENT_HANDLERS: dict[str, EventHandler] = {
    "invoice.paid": _on_invoice_paid,
    "invoice.payment_failed": _on_payment_failed,
    "customer.subscription.deleted": _on_subscription_deleted,
}

HANDLED_EVENTS = tuple(_EVENT_HANDLERS)  # the event types to enable on the Stripe webhook endpoint
