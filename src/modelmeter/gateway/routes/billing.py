"""Tenant billing: the subscription (plan, period, included and used quantities, budget) and invoices."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from modelmeter import clock
from modelmeter.billing import invoicing
from modelmeter.billing.accounts import SubscriptionPublic
from modelmeter.billing.credits import CreditList, CreditPurchaseCreate, CreditPurchasePublic
from modelmeter.billing.invoicing import InvoicePublic
from modelmeter.billing.periods import period_of
from modelmeter.billing.spend import period_usage
from modelmeter.billing.tables import Invoice
from modelmeter.errors import NotFoundError
from modelmeter.gateway.deps import BillingPrincipal, BillingWritePrincipal, ListDep, ServicesDep, SessionDep
from modelmeter.gateway.schemas import TENANT_READ, TENANT_WRITE, errors
from modelmeter.ops import credits as ops
from modelmeter.shapes import Page
from modelmeter.tenancy.tenants import get_tenant

router = APIRouter(prefix="/v1/billing", tags=["billing"])


@router.get("/subscription", response_model=SubscriptionPublic, responses=errors(*TENANT_READ))
def subscription(principal: BillingPrincipal, services: ServicesDep, session: SessionDep) -> SubscriptionPublic:
    tenant = get_tenant(session=session, tenant_id=principal.tenant_id)
    period = period_of(clock.now_s())
    used = period_usage(session=session, tenant_id=tenant.id, period=period)
    return SubscriptionPublic.of(tenant, services.plans.get(tenant.plan), period=period, used=used)


@router.get("/invoices/upcoming", response_model=InvoicePublic, responses=errors(*TENANT_READ))
def upcoming(principal: BillingPrincipal, services: ServicesDep, session: SessionDep) -> InvoicePublic:
    """The running period's invoice as it stands now (status ``draft``)."""
    tenant = get_tenant(session=session, tenant_id=principal.tenant_id)
    return invoicing.preview(session=session, catalog=services.plans, tenant_id=tenant.id, plan=tenant.plan)


@router.get("/invoices", response_model=Page[InvoicePublic], responses=errors(*TENANT_READ))
def invoices(principal: BillingPrincipal, session: SessionDep, page: ListDep) -> Page[InvoicePublic]:
    rows, has_more = invoicing.list_invoices(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                             after=page.after)
    return Page.of([InvoicePublic.of(i, invoicing.lines_of(session=session, invoice_id=i.id)) for i in rows], has_more)


@router.get("/invoices/{invoice_id}", response_model=InvoicePublic, responses=errors(*TENANT_READ, 404))
def invoice(invoice_id: str, principal: BillingPrincipal, session: SessionDep) -> InvoicePublic:
    row = session.get(Invoice, invoice_id)
    if row is None or row.tenant_id != principal.tenant_id:
        raise NotFoundError(f"No such invoice: '{invoice_id}'.", code="invoice_not_found", param="invoice_id")
    return InvoicePublic.of(row, invoicing.lines_of(session=session, invoice_id=row.id))


@router.get("/credits", response_model=CreditList, responses=errors(*TENANT_READ))
async def credits(principal: BillingPrincipal, services: ServicesDep, page: ListDep) -> CreditList:
    """The tenant's credit grants, newest first, and the balance of the live ones (draws in flight taken)."""
    live = await services.quota.credit_balances(principal.tenant_id)
    return await asyncio.to_thread(ops.list_credits, sessions=services.sessions, tenant_id=principal.tenant_id,
                                   limit=page.limit, after=page.after, live=live)


@router.post("/credits/purchase", status_code=201, response_model=CreditPurchasePublic, responses=errors(*TENANT_WRITE))
def purchase(data: CreditPurchaseCreate, principal: BillingWritePrincipal, services: ServicesDep
             ) -> CreditPurchasePublic:
    """Buy credits: Stripe invoices the amount; the credits are granted when Stripe reports the invoice paid."""
    return ops.purchase_credits(sessions=services.sessions, catalog=services.plans, tenant_id=principal.tenant_id,
                                data=data)
