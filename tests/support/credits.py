"""Prepaid credits put straight into the ledger, as the admin API or a paid Stripe purchase would."""

from __future__ import annotations

from modelmeter import clock
from modelmeter.billing import credits
from modelmeter.gateway.services import Services


def grant_credits(services: Services, tenant_id: str, cents: int, source: str) -> str:
    """A granted grant (``source="granted"``), or a purchase Stripe reported paid: its grant's id."""
    with services.sessions() as session:
        if source == "granted":
            grant_id = credits.grant(session=session, tenant_id=tenant_id, amount_cents=cents, source="granted").id
        else:
            purchase = credits.create_purchase(session=session, tenant_id=tenant_id, amount_cents=cents,
                                               currency="usd")
            assert credits.mark_paid(session=session, purchase=purchase, paid_at=clock.now_s(),
                                     stripe_invoice_id="in_stripe_x")
            grant_id = str(purchase.grant_id)
        session.commit()
    return str(grant_id)
