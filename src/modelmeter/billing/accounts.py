"""A tenant's billing account: what opening one and changing its plan write besides the tenant row.

Each function runs inside the caller's transaction (the service functions of :mod:`modelmeter.ops` own it),
so the tenant row, its plan history and the Stripe outbox row commit together or not at all.
"""

from __future__ import annotations

from sqlmodel import Session

from modelmeter.billing.invoicing import record_plan_change
from modelmeter.billing.stripe.outbox import enqueue_customer
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
