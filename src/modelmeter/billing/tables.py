"""Billing tables: the usage ledger, plan history, billing periods, invoices and their lines."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import BigInteger, Column, Index, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

UsageKind = Literal["inference", "training"]


class UsageEvent(SQLModel, table=True):
    """One billable event. ``request_id`` is unique: recording the same request twice is a no-op.

    ``period`` (``YYYY-MM``) is fixed when the row is written: the calendar month of ``created`` (UTC), or
    the next open month when that one is already closed, so late usage is never lost nor billed twice.
    """

    __tablename__ = "usage_event"
    __table_args__ = (
        Index("ix_usage_event_tenant_created", "tenant_id", "created"),
        Index("ix_usage_event_tenant_period", "tenant_id", "period"),
    )

    # BIGINT on PostgreSQL; INTEGER on SQLite, where only that type aliases the autoincrementing rowid.
    id: int | None = Field(
        default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    )
    request_id: str = Field(unique=True, max_length=64)
    tenant_id: str = Field(foreign_key="tenant.id", max_length=40)
    key_id: str | None = Field(default=None, max_length=40)
    model_id: str = Field(max_length=128)
    plan: str = Field(default="", max_length=64, sa_column_kwargs={"server_default": ""})
    kind: str = Field(default="inference", max_length=16)
    endpoint: str = Field(default="", max_length=32)
    device: str = Field(default="cpu", max_length=16)
    requests: int = 1
    inputs: int = 0
    tokens: int = 0
    training_tokens: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    queue_us: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    compute_us: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    period: str = Field(max_length=7)
    created: int


class PlanChange(SQLModel, table=True):
    """Plan history: the plan a tenant holds from ``effective_at`` on (base fees are prorated by it)."""

    __tablename__ = "plan_change"

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    )
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    plan: str = Field(max_length=64)
    effective_at: int


class BillingState(SQLModel, table=True):
    """One row: the latest closed period. Ledger writes read it FOR SHARE; a close updates it FOR UPDATE,
    so no usage row can slip into a period while it is being closed."""

    __tablename__ = "billing_state"

    id: int = Field(default=1, primary_key=True)
    closed_through: str | None = Field(default=None, max_length=7)


class BillingClose(SQLModel, table=True):
    __tablename__ = "billing_close"

    period: str = Field(primary_key=True, max_length=7)
    closed_at: int
    invoices: int


class Invoice(SQLModel, table=True):
    __tablename__ = "invoice"
    __table_args__ = (UniqueConstraint("tenant_id", "period", name="uq_invoice_tenant_period"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    period: str = Field(max_length=7)
    status: str = Field(default="open", max_length=16)
    currency: str = Field(max_length=3)
    subtotal: int = Field(sa_column=Column(BigInteger, nullable=False))
    total: int = Field(sa_column=Column(BigInteger, nullable=False))
    period_start: int
    period_end: int
    created: int
    stripe_invoice_id: str | None = Field(default=None, max_length=255)
    sync_status: str = Field(default="not_synced", max_length=16)
    paid_at: int | None = None


class InvoiceLine(SQLModel, table=True):
    __tablename__ = "invoice_line"

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    )
    invoice_id: str = Field(foreign_key="invoice.id", index=True, max_length=40)
    position: int
    code: str = Field(max_length=32)
    plan: str = Field(max_length=64)
    description: str = Field(max_length=500)
    quantity: int = Field(sa_column=Column(BigInteger, nullable=False))
    unit_amount_decimal: str = Field(max_length=40)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
