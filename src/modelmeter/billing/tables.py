"""Billing tables: the usage ledger, plan history, billing periods, invoices and their lines, Stripe sync."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel

UsageKind = Literal["inference", "training"]


BATCH_KIND = "batch"  # ``UsageEvent.kind`` of a Batch API line (priced at the plan's batch discount)


class UsageEvent(SQLModel, table=True):
    """One billable event. ``request_id`` is unique: recording the same request twice is a no-op.

    ``period`` (``YYYY-MM``) is fixed when the row is written: the calendar month of ``created`` (UTC), or
    the next open month when that one is already closed, so late usage is never lost nor billed twice.
    """

    __tablename__ = "usage_event"
    __table_args__ = (
        Index("ix_usage_event_tenant_created", "tenant_id", "created"),
        Index("ix_usage_event_tenant_period", "tenant_id", "period"),
        Index("ix_usage_event_period", "period"),
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
    payment_failed_at: int | None = None  # earliest invoice.payment_failed event (Stripe's ``created``)


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
    stripe_invoice_item_id: str | None = Field(default=None, max_length=255)


class StripeOutbox(SQLModel, table=True):
    """A Stripe mutation to make, written in the transaction of the change that causes it (transactional outbox).

    Rows of one tenant are sent in ``id`` order; ``idempotency_key`` is deterministic (``mm-<kind>-<object_id>``).
    ``status``: ``pending`` (waiting, retried with backoff), ``done``, ``failed`` (gave up; ``billing sync
    --retry-failed`` re-queues). ``locked_until`` is the lease of the relay sending it.
    """

    __tablename__ = "stripe_outbox"
    __table_args__ = (Index("ix_stripe_outbox_status_id", "status", "id"),)

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    )
    kind: str = Field(max_length=32)
    object_id: str = Field(max_length=64)
    tenant_id: str = Field(max_length=40, index=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    idempotency_key: str = Field(unique=True, max_length=255)
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: int
    locked_until: int | None = None
    last_error: str | None = Field(default=None, max_length=1000)
    created: int
    done_at: int | None = None
    stripe_id: str | None = Field(default=None, max_length=255)


class StripeEvent(SQLModel, table=True):
    """A Stripe webhook event applied once: its id is the primary key, so a repeated delivery is a no-op."""

    __tablename__ = "stripe_event"

    id: str = Field(primary_key=True, max_length=255)
    type: str = Field(max_length=64)
    created: int
    received_at: int
    tenant_id: str | None = Field(default=None, max_length=40, index=True)
    object_id: str | None = Field(default=None, max_length=255)
    outcome: str = Field(max_length=32)


class StripePlan(SQLModel, table=True):
    """The Stripe Product and Plan that mirror one catalog plan."""

    __tablename__ = "stripe_plan"

    plan: str = Field(primary_key=True, max_length=64)
    product_id: str = Field(max_length=255)
    price_id: str = Field(max_length=255)
    synced_at: int


class CreditGrant(SQLModel, table=True):
    """Prepaid credits a tenant holds: granted by the operator, or bought (a paid ``CreditPurchase``).

    What is left of a grant is ``amount_cents`` less its draws (``CreditDraw``); a grant past ``expires_at`` pays
    nothing more. Draws take granted credits before purchased ones, the soonest expiry first (``draw_rank``).
    """

    __tablename__ = "credit_grant"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    source: str = Field(max_length=16)  # granted | purchased
    amount_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    description: str | None = Field(default=None, max_length=500)
    expires_at: int | None = None
    purchase_id: str | None = Field(default=None, max_length=40, unique=True)  # one grant per paid purchase
    created: int


class CreditDraw(SQLModel, table=True):
    """Credits drawn from one grant by one usage row, written in the ledger transaction that writes the row."""

    __tablename__ = "credit_draw"
    __table_args__ = (
        UniqueConstraint("request_id", "grant_id", name="uq_credit_draw_request_grant"),
        Index("ix_credit_draw_tenant_period", "tenant_id", "period"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    )
    request_id: str = Field(max_length=64)
    grant_id: str = Field(foreign_key="credit_grant.id", index=True, max_length=40)
    tenant_id: str = Field(max_length=40)
    period: str = Field(max_length=7)
    amount_micro: int = Field(sa_column=Column(BigInteger, nullable=False))
    created: int


class CreditPurchase(SQLModel, table=True):
    """A tenant's top-up: billed through the Stripe outbox; its credits are granted once Stripe reports it paid."""

    __tablename__ = "credit_purchase"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    amount_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(max_length=3)
    status: str = Field(default="pending", max_length=16)  # pending | paid
    stripe_invoice_id: str | None = Field(default=None, max_length=255)
    grant_id: str | None = Field(default=None, max_length=40)
    created: int
    paid_at: int | None = None


class AlertSetting(SQLModel, table=True):
    """A tenant's usage alerts: thresholds (percent of the budget, or of included tokens without one), the URL
    events are POSTed to, and the secret that signs them (shown once, when set)."""

    __tablename__ = "alert_setting"

    tenant_id: str = Field(primary_key=True, foreign_key="tenant.id", max_length=40)
    thresholds: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    url: str = Field(max_length=2000)
    secret: str = Field(max_length=255)  # sealed (``alerts.secret_sealer``); a pre-0011 one may be plain
    created: int
    updated: int


class AlertEvent(SQLModel, table=True):
    """An event of the tenant's (``GET /v1/events``, and POSTed to its alert URL), of one of two kinds:

    - ``usage.threshold_crossed``: a threshold crossed, written in the ledger transaction of the usage that crossed
      it, once per (tenant, period, resource, threshold) whatever replays or replicas do (unique, ``ON CONFLICT DO
      NOTHING``). ``value`` and ``limit_value`` are cents (``budget``) or tokens (``included_tokens``).
    - ``batch.completed`` / ``batch.failed``: a batch ended, written in the transaction that sets its final status,
      once per batch (unique ``(batch_id, type)``, ``ON CONFLICT DO NOTHING``); the ``requests_*`` counts and the
      file ids are the batch's when it ended.

    The columns of the other kind are NULL (distinct in a unique constraint, so neither kind's constraint holds the
    other's rows)."""

    __tablename__ = "alert_event"
    __table_args__ = (
        UniqueConstraint("tenant_id", "period", "resource", "threshold_percent", name="uq_alert_event_crossing"),
        Index("uq_alert_event_batch", "batch_id", "type", unique=True),
        Index("ix_alert_event_tenant_id", "tenant_id", "id"),
    )

    id: str = Field(primary_key=True, max_length=40)
    type: str = Field(default="usage.threshold_crossed", max_length=64)
    tenant_id: str = Field(max_length=40)
    created: int
    # usage.threshold_crossed
    period: str | None = Field(default=None, max_length=7)
    resource: str | None = Field(default=None, max_length=32)  # budget | included_tokens
    threshold_percent: int | None = None
    value: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    limit_value: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    # batch.completed, batch.failed
    batch_id: str | None = Field(default=None, max_length=40)
    requests_total: int | None = None
    requests_completed: int | None = None
    requests_failed: int | None = None
    output_file_id: str | None = Field(default=None, max_length=40)
    error_file_id: str | None = Field(default=None, max_length=40)


class AlertDelivery(SQLModel, table=True):
    """One event to POST to one URL (an outbox row, written with the event). ``status``: ``pending`` (waiting,
    retried with backoff), ``done`` (a 2xx came back), ``failed`` (gave up after the maximum attempts).
    ``locked_until`` is the lease of the relay sending it."""

    __tablename__ = "alert_delivery"
    __table_args__ = (Index("ix_alert_delivery_status_id", "status", "id"),)

    id: int | None = Field(
        default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    )
    event_id: str = Field(foreign_key="alert_event.id", index=True, max_length=40)
    tenant_id: str = Field(max_length=40)
    url: str = Field(max_length=2000)
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: int
    locked_until: int | None = None
    last_status: int | None = None
    last_error: str | None = Field(default=None, max_length=1000)
    created: int
    done_at: int | None = None
