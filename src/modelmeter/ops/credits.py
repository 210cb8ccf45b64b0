"""Prepaid credits as the operator grants them and a tenant buys them."""

from __future__ import annotations

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter.billing import credits
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.stripe.outbox import enqueue_credit_purchase, outbox_enabled
from modelmeter.errors import ConflictError
from modelmeter.tenancy.tenants import get_tenant

Sessions = sessionmaker[Session]


def list_credits(*, sessions: Sessions, tenant_id: str, limit: int, after: str | None,
                 live: dict[str, int] | None = None) -> credits.CreditList:
    """The tenant's grants and balance (404 for an unknown tenant)."""
    with sessions() as session:
        get_tenant(session=session, tenant_id=tenant_id)
        return credits.credits_page(session=session, tenant_id=tenant_id, limit=limit, after=after, live=live)


def purchase_credits(*, sessions: Sessions, catalog: PlanCatalog, tenant_id: str,
                     data: credits.CreditPurchaseCreate) -> credits.CreditPurchasePublic:
    """A pending top-up and its Stripe invoice, queued in one transaction (409 when Stripe is not configured)."""
    with sessions() as session:
        if not outbox_enabled(session=session):
            raise ConflictError(
                "Credit purchases are paid through Stripe, which this deployment has not configured; "
                "ask the operator for a credit grant.", code="payments_unavailable")
        tenant = get_tenant(session=session, tenant_id=tenant_id)
        purchase = credits.create_purchase(session=session, tenant_id=tenant_id, amount_cents=data.amount_cents,
                                           currency=catalog.get(tenant.plan).currency)
        enqueue_credit_purchase(session=session, purchase=purchase)
        session.commit()
        return credits.CreditPurchasePublic.of(purchase)
