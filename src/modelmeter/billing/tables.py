"""Billing tables: the usage ledger (one row per served request or training run)."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import BigInteger, Column, Index, Integer
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
