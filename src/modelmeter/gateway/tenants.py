"""Tenant and API-key tables, their public shapes, and the queries on them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import StringConstraints
from sqlmodel import Field, Session, SQLModel, col, select
from sqlmodel._compat import SQLModelConfig

from modelmeter import clock
from modelmeter.billing import stripe_sync
from modelmeter.billing.invoicing import record_plan_change
from modelmeter.errors import NotFoundError
from modelmeter.ids import new_id

TenantStatus = Literal["active", "suspended"]
BillingStatus = Literal["ok", "past_due"]
Scope = Literal["inference", "fine-tune", "billing:read"]
ALL_SCOPES: tuple[str, ...] = ("inference", "fine-tune", "billing:read")

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Email = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
]
PlanId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Rpm = Annotated[int, Field(ge=1, le=1_000_000)]
Tpm = Annotated[int, Field(ge=1, le=1_000_000_000)]
Budget = Annotated[int, Field(ge=0, le=1_000_000_000)]

FORBID = SQLModelConfig(extra="forbid")


# --- tenants -------------------------------------------------------------------------------------


class TenantBase(SQLModel):
    name: str = Field(max_length=200)
    email: str = Field(max_length=254)
    plan: str = Field(max_length=64)


class TenantCreate(SQLModel):
    model_config = FORBID
    name: Name
    email: Email
    plan: PlanId = "free"


class TenantUpdate(SQLModel):
    model_config = FORBID
    name: Name | None = None
    email: Email | None = None
    plan: PlanId | None = None
    status: TenantStatus | None = None
    billing_status: BillingStatus | None = None
    rpm_limit: Rpm | None = None
    tpm_limit: Tpm | None = None
    monthly_budget_cents: Budget | None = None


class Tenant(TenantBase, table=True):
    id: str = Field(primary_key=True, max_length=40)
    status: str = Field(default="active", max_length=16)
    billing_status: str = Field(default="ok", max_length=16)
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    monthly_budget_cents: int | None = None
    stripe_customer_id: str | None = Field(default=None, max_length=255)
    stripe_subscription_id: str | None = Field(default=None, max_length=255)
    past_due_since: int | None = None
    suspension_reason: str | None = Field(default=None, max_length=32)  # set when billing suspended it
    plan_changed_at: int | None = None
    created: int
    updated: int


class TenantPublic(TenantBase):
    id: str
    object: Literal["tenant"] = "tenant"
    status: str
    billing_status: str
    rpm_limit: int | None
    tpm_limit: int | None
    monthly_budget_cents: int | None
    stripe_customer_id: str | None
    created: int
    updated: int


def create_tenant(*, session: Session, data: TenantCreate) -> Tenant:
    now = clock.now_s()
    tenant = Tenant(id=new_id("ten"), name=data.name, email=data.email, plan=data.plan, created=now, updated=now)
    session.add(tenant)
    session.flush()
    stripe_sync.enqueue_customer(session=session, tenant_id=tenant.id, email=tenant.email, name=tenant.name)
    record_plan_change(session=session, tenant_id=tenant.id, plan=tenant.plan, at=now)
    return tenant


def get_tenant(*, session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFoundError(f"No tenant with id '{tenant_id}'.", param="id")
    return tenant


def update_tenant(*, session: Session, tenant: Tenant, data: TenantUpdate) -> Tenant:
    changes = data.model_dump(exclude_unset=True)
    now = clock.now_s()
    if "plan" in changes and changes["plan"] != tenant.plan:
        tenant.plan_changed_at = now
        record_plan_change(session=session, tenant_id=tenant.id, plan=changes["plan"], at=now)
    if changes.get("billing_status") == "ok":
        tenant.past_due_since = None
    if "status" in changes:
        tenant.suspension_reason = None  # an operator's decision is not billing's to undo
    for field, value in changes.items():
        setattr(tenant, field, value)
    tenant.updated = now
    session.add(tenant)
    session.flush()
    return tenant


def list_tenants(*, session: Session, limit: int, after: str | None) -> tuple[Sequence[Tenant], bool]:
    query = select(Tenant).order_by(col(Tenant.id).desc())
    if after:
        query = query.where(col(Tenant.id) < after)
    rows = session.exec(query.limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


# --- API keys ------------------------------------------------------------------------------------


class ApiKeyCreate(SQLModel):
    model_config = FORBID
    name: Name = "default"
    scopes: list[Scope] | None = None
    expires_at: Annotated[int, Field(gt=0)] | None = None


class ApiKeyRoll(SQLModel):
    model_config = FORBID
    grace_period_seconds: Annotated[int, Field(ge=0, le=30 * 24 * 3600)] | None = None


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    name: str = Field(max_length=200)
    prefix: str = Field(max_length=16)
    last4: str = Field(max_length=4)
    key_hash: str = Field(unique=True, max_length=64)
    scopes: str = Field(max_length=200)
    created: int
    expires_at: int | None = None
    revoked_at: int | None = None
    last_used_at: int | None = None
    rolled_to: str | None = Field(default=None, max_length=40)

    @property
    def scope_list(self) -> list[str]:
        return [s for s in self.scopes.split(",") if s]

    def status_at(self, now: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class ApiKeyPublic(SQLModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    name: str
    prefix: str
    last4: str
    scopes: list[str]
    status: str
    created: int
    expires_at: int | None
    revoked_at: int | None
    last_used_at: int | None
    rolled_to: str | None

    @classmethod
    def of(cls, key: ApiKey, *, now: int) -> ApiKeyPublic:
        return cls(
            id=key.id,
            tenant_id=key.tenant_id,
            name=key.name,
            prefix=key.prefix,
            last4=key.last4,
            scopes=key.scope_list,
            status=key.status_at(now),
            created=key.created,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            last_used_at=key.last_used_at,
            rolled_to=key.rolled_to,
        )


class ApiKeyCreated(ApiKeyPublic):
    """The only shape that carries the secret: returned once, at creation or roll."""

    key: str


def get_key(*, session: Session, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError(f"No API key with id '{key_id}'.", param="id")
    return key


def list_keys(*, session: Session, tenant_id: str, limit: int, after: str | None) -> tuple[Sequence[ApiKey], bool]:
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(col(ApiKey.id).desc())
    if after:
        query = query.where(col(ApiKey.id) < after)
    rows = session.exec(query.limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit
