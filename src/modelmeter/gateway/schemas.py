"""The public response shapes: what every route answers, declared once so that OpenAPI, generated clients and
the contract tests (schemathesis, in CI) agree with what the service sends.

Routes declare these as ``response_model``. Most routes build their body as a dict and FastAPI checks it against
the model on the way out (drift becomes a test failure, not a silent change). The inference routes return their
``JSONResponse`` directly, so FastAPI documents the schema without re-validating every float of an embedding on
the hot path. Every model forbids extra keys, so the document says exactly what a client receives.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from modelmeter.billing.catalog import Plan

T = TypeVar("T")


class Public(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors ----------------------------------------------------------------------------------------


class ErrorDetail(Public):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorBody(Public):
    """The one error envelope."""

    error: ErrorDetail


_WHY = {
    400: "Malformed request: the body is not JSON or not a form, or a header is invalid (Idempotency-Key).",
    401: "Missing, malformed, unknown, revoked or expired API key.",
    403: "The key lacks the scope, the tenant is suspended, or a tenant key called an admin route.",
    404: "No such object or model (another tenant's objects answer exactly as missing ones).",
    409: "The object's state forbids it, or this Idempotency-Key's first request is still in flight.",
    413: "The body is over the size limit.",
    415: "The body is in a media type this route does not take.",
    422: "An invalid or unknown field (named in `param`), or an Idempotency-Key reused with another body.",
    429: "`rate_limit_exceeded` or `overloaded` (retry after Retry-After), or `insufficient_quota` (do not retry).",
    503: "A part the request needs is unavailable.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the envelope schema."""
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}


TENANT_READ = (401, 403, 422, 429)  # every authenticated route: a bad query parameter is a 422; limits answer 429
TENANT_WRITE = (400, 401, 403, 409, 413, 415, 422, 429)  # a body, and a POST's Idempotency-Key
ADMIN_READ = (401, 403, 422)
ADMIN_WRITE = (400, 401, 403, 409, 413, 415, 422)


# --- lists -----------------------------------------------------------------------------------------


class Page(Public, Generic[T]):
    """Every list: ``{"object": "list", "data": [...], "has_more": bool}`` (the OpenAI and Stripe convention)."""

    object: Literal["list"]
    data: list[T]
    has_more: bool


# --- inference -------------------------------------------------------------------------------------


class TokenUsage(Public):
    prompt_tokens: int
    total_tokens: int


class Classification(Public):
    index: int
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(Public):
    object: Literal["list"]
    model: str
    data: list[Classification]
    usage: TokenUsage


class Embedding(Public):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32 with encoding_format=base64


class EmbeddingsResponse(Public):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: TokenUsage


class LabelScore(Public):
    label: str
    score: float


class EntityGroup(Public):
    """An entity: its type, the mean (or first, or max) score of its tokens, and where it is in the input."""

    entity_group: str
    score: float
    word: str  # input[start:end]
    start: int  # character offsets into the input
    end: int


class TokenEntity(Public):
    """One sub-token's label (``aggregation_strategy: "none"``), as Hugging Face answers it."""

    entity: str
    score: float
    index: int  # the token's position in the encoded input ([CLS] is 0)
    word: str
    start: int
    end: int


class Entities(Public):
    index: int
    entities: list[EntityGroup] | list[TokenEntity]


class EntitiesResponse(Public):
    object: Literal["list"]
    model: str
    data: list[Entities]
    usage: TokenUsage


# Hugging Face's shapes: ranked labels per input (text classification), one vector per input (features), the
# entities of one input (token classification, a string input) or of each (a list).
HFResponse = (list[list[LabelScore]] | list[list[float]] | list[EntityGroup] | list[TokenEntity]
              | list[list[EntityGroup]] | list[list[TokenEntity]])


# --- usage, billing, dashboard ---------------------------------------------------------------------


class UsageResult(Public):
    object: Literal["usage.result"]
    requests: int
    tokens: int
    training_tokens: int
    cost_cents: int
    cost_cents_decimal: str
    model: str | None = None  # with group_by=model
    key_id: str | None = None  # with group_by=key
    plan: str | None = None  # with group_by=plan


class UsageBucket(Public):
    object: Literal["bucket"]
    start_time: int
    end_time: int
    results: list[UsageResult]


class Quantities(Public):
    requests: int
    tokens: int
    training_tokens: int


class Limits(Public):
    rpm: int
    tpm: int


class Budget(Public):
    monthly_budget_cents: int | None
    spent_cents: int
    spent_cents_decimal: str
    remaining_cents: int | None


class Subscription(Public):
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


class InvoiceLine(Public):
    object: Literal["line_item"]
    code: str
    plan: str | None
    description: str
    quantity: int
    unit_amount_decimal: str
    amount: int


class Invoice(Public):
    id: str | None  # None on the upcoming (draft) invoice
    object: Literal["invoice"]
    tenant_id: str
    period: str
    status: str
    currency: str
    period_start: int
    period_end: int
    created: int | None
    lines: Page[InvoiceLine]
    subtotal: int
    total: int
    sync_status: str
    stripe_invoice_id: str | None
    paid_at: int | None


class CreditGrant(Public):
    id: str
    object: Literal["credit_grant"]
    amount_cents: int
    remaining_cents: int  # what is left, in whole cents (rounded down); 0 once expired
    source: Literal["granted", "purchased"]
    description: str | None
    status: Literal["active", "used", "expired"]
    expires_at: int | None
    created: int


class CreditList(Page[CreditGrant]):
    balance_cents: int  # what every live grant holds, in whole cents (rounded down)


class CreditPurchase(Public):
    id: str
    object: Literal["credit_purchase"]
    amount_cents: int
    currency: str
    status: Literal["pending", "paid"]
    credit_grant: str | None  # the grant made when Stripe reported the invoice paid
    stripe_invoice_id: str | None
    created: int
    paid_at: int | None


class DashboardLink(Public):
    object: Literal["dashboard_link"]
    url: str
    expires_at: int


# --- operator --------------------------------------------------------------------------------------


class BillingClose(Public):
    object: Literal["billing_close"]
    period: str
    invoices: int
    already_closed: bool
    closed_at: int


class UnitEconomics(Public):
    object: Literal["unit_economics"]
    period: str
    tenant_id: str | None = None  # group_by=tenant
    plan: str | None = None  # group_by=plan
    plans: list[str] | None = None  # group_by=tenant: the plans the tenant was on in the period
    currency: str
    revenue_cents: int
    revenue_source: str
    compute_cost_cents: int
    compute_cost_cents_decimal: str
    margin_cents: int
    margin_ratio: str | None
    requests: int
    tokens: int
    training_tokens: int
    cpu_compute_ms: int
    gpu_compute_ms: int


class SimulationFigures(Public):
    """Cents summed over the simulation's rows."""

    revenue_actual_cents: int
    revenue_simulated_cents: int
    compute_cost_cents: int
    margin_actual_cents: int
    margin_simulated_cents: int


class SimulationRow(SimulationFigures):
    """One tenant: its plans in the period (``+``-joined when it changed) and the simulated one, both revenues
    (the unit economics view's), the compute cost and both margins."""

    tenant_id: str
    plan_actual: str
    plan_simulated: str


class Simulation(Public):
    object: Literal["simulation"]
    period: str
    data: list[SimulationRow]
    totals: SimulationFigures


class WebhookReceipt(Public):
    received: bool
    outcome: str


class Health(Public):
    status: Literal["ok"]


class Ready(Public):
    status: Literal["ready"]
    checks: dict[str, str]


class EngineFront(Public):
    pid: int


class EngineReport(Public):
    """One engine process (or the in-process engine) and its counters since it started."""

    pid: int
    device: str
    simulated: bool
    batches: int
    rows: int
    mixed_batches: int  # batches carrying rows of more than one front
    queue_rows: int
    adapters_resident: int
    dropped_messages: int


class EngineStatus(Public):
    """``GET /admin/engine``: the fronts the engines have heard from, and every engine."""

    fronts: list[EngineFront]
    engines: list[EngineReport]


# --- usage alerts and events -----------------------------------------------------------------------


class AlertSettings(Public):
    object: Literal["alert_settings"]
    thresholds: list[int]  # percent of the monthly budget, or of the plan's included tokens without one
    url: str | None


class AlertSettingsCreated(AlertSettings):
    secret: str  # signs each delivery (header modelmeter-signature); shown only in this response


class EventData(Public):
    period: str
    resource: Literal["budget", "included_tokens"]
    threshold_percent: int
    value: int  # cents spent (budget) or tokens used (included_tokens), when the threshold was crossed
    limit: int  # the budget in cents, or the included tokens


class Event(Public):
    id: str
    object: Literal["event"]
    type: Literal["usage.threshold_crossed"]
    created: int
    data: EventData


class EventDelivery(Public):
    id: str
    object: Literal["event_delivery"]
    event_id: str
    tenant_id: str
    url: str
    status: Literal["pending", "done", "failed"]
    attempts: int
    next_attempt_at: int
    last_status: int | None  # the receiver's last HTTP status (None: no answer)
    last_error: str | None
    created: int
    done_at: int | None
