"""Tenant billing: the subscription (plan, period, included and used quantities, budget) and invoices."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from modelmeter import clock
from modelmeter.billing import invoicing
from modelmeter.billing.credits import CreditPurchaseCreate
from modelmeter.billing.periods import period_bounds, period_of
from modelmeter.billing.spend import budget_spend_micro, period_usage
from modelmeter.billing.tables import Invoice
from modelmeter.errors import NotFoundError
from modelmeter.gateway.deps import (
    BillingPrincipal,
    BillingWritePrincipal,
    ListDep,
    ServicesDep,
    SessionDep,
    list_body,
)
from modelmeter.gateway.schemas import TENANT_READ, TENANT_WRITE, CreditList, CreditPurchase, Page, Subscription, errors
from modelmeter.gateway.schemas import Invoice as InvoiceOut
from modelmeter.money import cents_text, micro_to_cents
from modelmeter.ops import credits as ops
from modelmeter.tenancy.tenants import get_tenant

router = APIRouter(prefix="/v1/billing", tags=["billing"])


@router.get("/subscription", response_model=Subscription, responses=errors(*TENANT_READ))
def subscription(principal: BillingPrincipal, services: ServicesDep, session: SessionDep) -> dict[str, Any]:
    tenant = get_tenant(session=session, tenant_id=principal.tenant_id)
    plan = services.plans.get(tenant.plan)
    period = period_of(clock.now_s())
    start, end = period_bounds(period)
    used = period_usage(session=session, tenant_id=tenant.id, period=period)
    spent_micro = budget_spend_micro(plan, used)
    spent_cents, spent_exact = micro_to_cents(spent_micro), cents_text(spent_micro)
    budget = tenant.monthly_budget_cents
    return {
        "object": "subscription", "tenant_id": tenant.id, "plan": plan.model_dump(mode="json"),
        "status": tenant.status, "billing_status": tenant.billing_status, "current_period": period,
        "current_period_start": start, "current_period_end": end, "hard_limit": plan.hard_limit,
        "included": {"requests": plan.included_requests, "tokens": plan.included_tokens,
                     "training_tokens": plan.included_training_tokens},
        "used": {"requests": used.requests, "tokens": used.tokens, "training_tokens": used.training_tokens},
        "limits": {"rpm": tenant.rpm_limit or plan.rpm_limit, "tpm": tenant.tpm_limit or plan.tpm_limit},
        "budget": {"monthly_budget_cents": budget, "spent_cents": spent_cents, "spent_cents_decimal": spent_exact,
                   "remaining_cents": None if budget is None else max(0, budget - spent_cents)},
    }


@router.get("/invoices/upcoming", response_model=InvoiceOut, responses=errors(*TENANT_READ))
def upcoming(principal: BillingPrincipal, services: ServicesDep, session: SessionDep) -> dict[str, Any]:
    """The running period's invoice as it stands now (status ``draft``)."""
    tenant = get_tenant(session=session, tenant_id=principal.tenant_id)
    return invoicing.preview(session=session, catalog=services.plans, tenant_id=tenant.id, plan=tenant.plan)


@router.get("/invoices", response_model=Page[InvoiceOut], responses=errors(*TENANT_READ))
def invoices(principal: BillingPrincipal, session: SessionDep, page: ListDep) -> dict[str, Any]:
    rows, has_more = invoicing.list_invoices(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                             after=page.after)
    invoices = [invoicing.invoice_public(i, invoicing.lines_of(session=session, invoice_id=i.id)) for i in rows]
    return list_body(invoices, has_more)


@router.get("/invoices/{invoice_id}", response_model=InvoiceOut, responses=errors(*TENANT_READ, 404))
def invoice(invoice_id: str, principal: BillingPrincipal, session: SessionDep) -> dict[str, Any]:
    row = session.get(Invoice, invoice_id)
    if row is None or row.tenant_id != principal.tenant_id:
        raise NotFoundError(f"No such invoice: '{invoice_id}'.", code="invoice_not_found", param="invoice_id")
    return invoicing.invoice_public(row, invoicing.lines_of(session=session, invoice_id=row.id))


@router.get("/credits", response_model=CreditList, responses=errors(*TENANT_READ))
async def credits(principal: BillingPrincipal, services: ServicesDep, page: ListDep) -> dict[str, Any]:
    """The tenant's credit grants, newest first, and the balance of the live ones (draws in flight taken)."""
    live = await services.quota.credit_balances(principal.tenant_id)
    return await asyncio.to_thread(ops.list_credits, sessions=services.sessions, tenant_id=principal.tenant_id,
                                   limit=page.limit, after=page.after, live=live)


@router.post("/credits/purchase", status_code=201, response_model=CreditPurchase, responses=errors(*TENANT_WRITE))
def purchase(data: CreditPurchaseCreate, principal: BillingWritePrincipal, services: ServicesDep) -> dict[str, Any]:
    """Buy credits: Stripe invoices the amount; the credits are granted when Stripe reports the invoice paid."""
    return ops.purchase_credits(sessions=services.sessions, catalog=services.plans, tenant_id=principal.tenant_id,
                                data=data)
