"""Tenants and their keys, as the operator manages them."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter import clock
from modelmeter.billing import accounts
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.errors import ConflictError
from modelmeter.tenancy import keys, tenants
from modelmeter.tenancy.keys import ApiKey, ApiKeyCreate
from modelmeter.tenancy.tenants import Tenant, TenantCreate, TenantUpdate

Sessions = sessionmaker[Session]


def create_tenant(*, sessions: Sessions, catalog: PlanCatalog, data: TenantCreate) -> Tenant:
    """A tenant on an existing plan, with its billing account (plan history, Stripe customer queued)."""
    catalog.get(data.plan)
    with sessions() as session:
        tenant = accounts.create_tenant(session=session, data=data)
        session.commit()
        return tenant


def update_tenant(*, sessions: Sessions, catalog: PlanCatalog, tenant_id: str, data: TenantUpdate) -> Tenant:
    """Apply an operator's change to an existing tenant (404 first); a new plan must exist in the catalog."""
    with sessions() as session:
        tenant = tenants.get_tenant(session=session, tenant_id=tenant_id)
        if data.plan is not None:
            catalog.get(data.plan)
        tenant = accounts.update_tenant(session=session, tenant=tenant, data=data)
        session.commit()
        return tenant


def get_tenant(*, sessions: Sessions, tenant_id: str) -> Tenant:
    with sessions() as session:
        return tenants.get_tenant(session=session, tenant_id=tenant_id)


def list_tenants(*, sessions: Sessions, limit: int, after: str | None) -> tuple[Sequence[Tenant], bool]:
    with sessions() as session:
        return tenants.list_tenants(session=session, limit=limit, after=after)


def issue_key(*, sessions: Sessions, tenant_id: str, data: ApiKeyCreate) -> tuple[ApiKey, str]:
    """A new key for an existing tenant: the row and the plaintext (shown once)."""
    with sessions() as session:
        tenants.get_tenant(session=session, tenant_id=tenant_id)
        row, plaintext = keys.issue_key(session=session, tenant_id=tenant_id, data=data)
        session.commit()
        return row, plaintext


def list_keys(*, sessions: Sessions, tenant_id: str, limit: int, after: str | None) -> tuple[Sequence[ApiKey], bool]:
    with sessions() as session:
        tenants.get_tenant(session=session, tenant_id=tenant_id)
        return keys.list_keys(session=session, tenant_id=tenant_id, limit=limit, after=after)


def revoke_key(*, sessions: Sessions, key_id: str) -> ApiKey:
    """Revoke a key (revoking a revoked key changes nothing)."""
    with sessions() as session:
        key = keys.revoke_key(session=session, key=keys.get_key(session=session, key_id=key_id))
        session.commit()
        return key


def roll_key(*, sessions: Sessions, key_id: str, grace_s: int) -> tuple[ApiKey, str]:
    """A successor for an active key; the old one keeps working for ``grace_s``."""
    with sessions() as session:
        key = keys.get_key(session=session, key_id=key_id)
        if key.status_at(clock.now_s()) != "active":
            raise ConflictError("Only an active key can be rolled.", code="key_not_active")
        new, plaintext = keys.roll_key(session=session, key=key, grace_s=grace_s)
        session.commit()
        return new, plaintext
