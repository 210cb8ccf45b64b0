"""A tenant's billing account: what opening one and changing its plan write besides the tenant row, and the
subscription, its public view (``SubscriptionPublic.of``).

Each function runs inside the caller's transaction (the service functions of :mod:`modelmeter.ops` own it),
so the tenant row, its plan history and the Stripe outbox row commit together or not at all.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict
from sqlmodel import Session

from modelmeter.billing.catalog import Plan
from modelmeter.billing.invoicing import record_plan_change
from modelmeter.billing.periods import period_bounds
from modelmeter.billing.pricing import Usage
from modelmeter.billing.spend import budget_spend_micro
from modelmeter.billing.stripe.outbox import enqueue_customer
from modelmeter.money import cents_text, micro_to_cents
from modelmeter.shapes import Public
from modelmeter.tenancy.tenants import Tenant, TenantCreate, TenantUpdate
from modelmeter.tenancy.tenants import create_tenant as insert_tenant
from modelmeter.tenancy.tenants import update_tenant as apply_update


def create_tenant(*, session: Session, data: TenantCreate) -> Tenant:
    """A new tenant with its billing account: plan history from now, and its Stripe customer queued."""
    tenant = insert_tenant(session=session, data=data)
    enqueue_customer(session=session, tenant_id=tenant.id, email=tenant.email, name=tenant.name)
    record_plan_change(session=session, tenant_id=tenant.id, plan=tenant.plan, at=tenant.created)
    return tenant


def update_tenant(*, session: Session, tenant: Tenant, data: TenantUpdate) -> Tenant:
    """Apply an operator's change; a plan change starts a new plan segment (prorated at the close)."""
    previous = tenant.plan
    tenant = apply_update(session=session, tenant=tenant, data=data)
    if tenant.plan != previous:
        record_plan_change(session=session, tenant_id=tenant.id, plan=tenant.plan, at=tenant.updated)
    return tenant


# --- the subscription ---------------------------------------------------------------------------------------


class Quantities(Public):
    requests: int
    tokens: int
    training_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> Quantities:
        return cls(requests=usage.requests, tokens=usage.tokens, training_tokens=usage.training_tokens)


class Limits(Public):
    rpm: int
    tpm: int


class Budget(Public):
    monthly_budget_cents: int | None
    spent_cents: int  # spend.budget_spend_micro: the period's usage at the current plan, what the budget holds to
    spent_cents_decimal: str
    remaining_cents: int | None


class SubscriptionPublic(Public):
    """``GET /v1/billing/subscription``: the plan, the running period, what it includes, what is used, the
    limits and the budget."""

    model_config = ConfigDict(title="Subscription")

    object: Literal["subscription"]
    tenant_id: str
    plan: Plan
    status: str
    billing_status: str
    current_period: str
    current_period_start: int
    current_period_end: int
    hard_limit: bool
    included: Quantities
    used: Quantities
    limits: Limits
    budget: Budget

    @classmethod
    def of(cls, tenant: Tenant, plan: Plan, *, period: str, used: Usage) -> SubscriptionPublic:
        start, end = period_bounds(period)
        spent_micro = budget_spend_micro(plan, used)
        spent_cents, budget = micro_to_cents(spent_micro), tenant.monthly_budget_cents
        return cls(
            object="subscription", tenant_id=tenant.id, plan=plan, status=tenant.status,
            billing_status=tenant.billing_status, current_period=period, current_period_start=start,
            current_period_end=end, hard_limit=plan.hard_limit,
            included=Quantities(requests=plan.included_requests, tokens=plan.included_tokens,
                                training_tokens=plan.included_training_tokens),
            used=Quantities.of(used),
            limits=Limits(rpm=tenant.rpm_limit or plan.rpm_limit, tpm=tenant.tpm_limit or plan.tpm_limit),
            budget=Budget(monthly_budget_cents=budget, spent_cents=spent_cents,
                          spent_cents_decimal=cents_text(spent_micro),
                          remaining_cents=None if budget is None else max(0, budget - spent_cents)),
        )
