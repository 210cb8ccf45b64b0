"""The tenant table, its public shapes, and the queries on it (the one definition of the table).

A tenant row carries its billing account (plan, billing status, Stripe ids, budget): billing reads and writes
those columns through this model; the side effects of opening an account or changing a plan are billing's
(:mod:`modelmeter.billing.accounts`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Strict, StringConstraints, ValidationInfo, field_validator
from sqlmodel import Field, Session, SQLModel, col, select, update
from sqlmodel._compat import SQLModelConfig

from modelmeter import clock
from modelmeter.errors import NotFoundError
from modelmeter.fields import INTEGRAL, PYTHON_RE
from modelmeter.ids import new_id

TenantStatus = Literal["active", "suspended"]
BillingStatus = Literal["ok", "past_due"]

# Patterns name their whitespace explicitly: ``\s`` means different characters to Python's ``re``, Rust's regex
# and Hypothesis, and the schema's readers use all three. A name is kept as given and needs a visible character.
_SPACE = r" \t\n\r\f\v"
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=f"[^{_SPACE}]")]
Email = Annotated[
    str, StringConstraints(max_length=254, pattern=f"^[^@{_SPACE}]+@[^@{_SPACE}]+\\.[^@{_SPACE}]+$")
]
PlanId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Rpm = Annotated[int, Strict(), Field(ge=1, le=1_000_000), INTEGRAL]
Tpm = Annotated[int, Strict(), Field(ge=1, le=1_000_000_000), INTEGRAL]
Budget = Annotated[int, Strict(), Field(ge=0, le=1_000_000_000), INTEGRAL]

FORBID = SQLModelConfig(extra="forbid", regex_engine=PYTHON_RE)


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


def _not_nullable(schema: dict[str, Any]) -> None:
    """Document an optional field that takes no null: drop the null branch and the null default."""
    branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
    schema.pop("default", None)
    if len(branches) == 1:
        schema.update(branches[0])
    elif branches:
        schema["anyOf"] = branches


NOT_NULLABLE = pydantic.Field(json_schema_extra=_not_nullable)


class TenantUpdate(SQLModel):
    model_config = FORBID
    # May be left out, but not set to null: the validator below refuses null and the schema shows none.
    name: Annotated[Name | None, NOT_NULLABLE] = None
    email: Annotated[Email | None, NOT_NULLABLE] = None
    plan: Annotated[PlanId | None, NOT_NULLABLE] = None
    status: Annotated[TenantStatus | None, NOT_NULLABLE] = None
    billing_status: Annotated[BillingStatus | None, NOT_NULLABLE] = None
    rpm_limit: Rpm | None = None
    tpm_limit: Tpm | None = None
    monthly_budget_cents: Budget | None = None

    @field_validator("name", "email", "plan", "status", "billing_status", mode="before")
    @classmethod
    def _not_null(cls, value: object, info: ValidationInfo) -> object:
        """These may be left out of a PATCH, but not set to null (the limits' null means "the plan's own")."""
        if value is None:
            raise ValueError(f"{info.field_name} may be omitted but cannot be null")
        return value


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
    # Bumped whenever the tenant gains credits: a quota store that has seen an older value reloads the grants.
    credits_epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
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
    """Insert the tenant row (flushed, not committed); the billing account is opened by the caller."""
    now = clock.now_s()
    tenant = Tenant(id=new_id("ten"), name=data.name, email=data.email, plan=data.plan, created=now, updated=now)
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(*, session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFoundError(f"No tenant with id '{tenant_id}'.", param="id")
    return tenant


def update_tenant(*, session: Session, tenant: Tenant, data: TenantUpdate) -> Tenant:
    """Apply ``data`` to the row (flushed, not committed). A plan change is recorded by billing's caller."""
    changes = data.model_dump(exclude_unset=True)
    now = clock.now_s()
    if "plan" in changes and changes["plan"] != tenant.plan:
        tenant.plan_changed_at = now
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


def all_tenants(*, session: Session) -> Sequence[Tenant]:
    """Every tenant (billing's period close and economics walk them all)."""
    return session.exec(select(Tenant).order_by(col(Tenant.id))).all()


def lock_tenant(*, session: Session, tenant_id: str) -> None:
    """Serialise writers on one tenant until the transaction ends (a row lock on PostgreSQL, a write on SQLite).

    On PostgreSQL the lock is ``FOR NO KEY UPDATE``: it excludes other writers of the tenant but not the
    ``FOR KEY SHARE`` check of inserts that reference the tenant (the ledger's group commit, keys, files), which a
    plain ``FOR UPDATE`` would stall for the whole transaction.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.exec(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    else:
        session.exec(update(Tenant).where(col(Tenant.id) == tenant_id).values(updated=col(Tenant.updated)))


def list_tenants(*, session: Session, limit: int, after: str | None) -> tuple[Sequence[Tenant], bool]:
    query = select(Tenant).order_by(col(Tenant.id).desc())
    if after:
        query = query.where(col(Tenant.id) < after)
    rows = session.exec(query.limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit
