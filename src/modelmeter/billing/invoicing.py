"""Close a period into invoices, preview the running one, and read usage back from the ledger.

Rules (see README "Billing"): usage is priced by the plan in force when it was served; a plan's base fee is
prorated by the seconds the tenant held it in the period; each plan's allowances apply in full to the usage
served on it. Closing a period is idempotent: a tenant's invoice for a period is written once, in the same
transaction that advances ``billing_state.closed_through``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from pydantic import ConfigDict
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing import credits
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.periods import parse_period, period_bounds, period_of
from modelmeter.billing.pricing import Line, Usage, price_period, subtotal
from modelmeter.billing.spend import billed_spend_micro, usage_by_plan
from modelmeter.billing.stripe.outbox import enqueue_invoice, enqueue_plan_change
from modelmeter.billing.tables import (
    BillingClose,
    BillingState,
    Invoice,
    InvoiceLine,
    PlanChange,
)
from modelmeter.errors import ConflictError
from modelmeter.ids import new_id
from modelmeter.money import decimal_text
from modelmeter.shapes import Page, Public
from modelmeter.tenancy.tenants import Tenant, all_tenants


def record_plan_change(*, session: Session, tenant_id: str, plan: str, at: int | None = None) -> None:
    change = PlanChange(tenant_id=tenant_id, plan=plan, effective_at=clock.now_s() if at is None else at)
    session.add(change)
    enqueue_plan_change(session=session, change=change)


def plan_segments(*, session: Session, tenant_id: str, start: int, end: int) -> list[tuple[str, int]]:
    """Seconds of ``[start, end)`` spent on each plan, in order of first use."""
    changes = session.exec(
        select(PlanChange.plan, PlanChange.effective_at).where(PlanChange.tenant_id == tenant_id)
        .order_by(col(PlanChange.effective_at), col(PlanChange.id))
    ).all()
    seconds: dict[str, int] = {}
    for i, (plan, effective) in enumerate(changes):
        until = changes[i + 1][1] if i + 1 < len(changes) else end
        overlap = min(until, end) - max(effective, start)
        if overlap > 0:
            seconds[plan] = seconds.get(plan, 0) + overlap
    return list(seconds.items())


def price_tenant_period(
    *, session: Session, catalog: PlanCatalog, tenant_id: str, period: str, current_plan: str
) -> list[Line]:
    """The invoice lines of one tenant's period, from its plan history and its ledger."""
    start, end = period_bounds(period)
    segments = plan_segments(session=session, tenant_id=tenant_id, start=start, end=end) or [(current_plan, 0)]
    usage = usage_by_plan(session.connection(), tenant_id=tenant_id, period=period)
    # price_period merges entries of the same plan: time held on it, and the usage served under it.
    triples = [(catalog.get(plan), secs, Usage()) for plan, secs in segments]
    triples += [(catalog.get(plan or current_plan), 0, amount) for plan, amount in usage.items()]
    return price_period(triples, seconds_in_period=end - start)


def credits_line(*, session: Session, tenant_id: str, period: str, lines: Sequence[Line], plan: str,
                 usage_micro: int) -> Line | None:
    """``Credits applied``: what the period's usage drew from prepaid credits, as a negative line, never more
    than the usage charges (so a total never goes below the base fees, nor below zero). ``usage_micro`` is the
    exact usage cost: when the draws paid all of it, the line is the usage lines' sum, their rounding included."""
    drawn = sum(credits.drawn_in_period(session=session, tenant_id=tenant_id, period=period).values())
    usage_cents = sum(line.amount for line in lines if line.code != "base_fee")
    applied = usage_cents if drawn and drawn >= usage_micro else credits.applied_cents(drawn, usage_cents)
    if applied <= 0:
        return None
    return Line(code="credits", description="Credits applied", quantity=1, unit_amount_decimal=Decimal(-applied),
                amount=-applied, plan=plan)


def invoice_lines(*, session: Session, catalog: PlanCatalog, tenant_id: str, period: str, current_plan: str
                  ) -> tuple[list[Line], int, int]:
    """A period's lines (charges, then credits applied), its subtotal (the charges) and its total."""
    lines = price_tenant_period(session=session, catalog=catalog, tenant_id=tenant_id, period=period,
                                current_plan=current_plan)
    charges = subtotal(lines)
    usage_micro = billed_spend_micro(catalog, usage_by_plan(session.connection(), tenant_id=tenant_id,
                                                            period=period), current_plan)
    applied = credits_line(session=session, tenant_id=tenant_id, period=period, lines=lines, plan=current_plan,
                           usage_micro=usage_micro)
    if applied is None:
        return lines, charges, charges
    return [*lines, applied], charges, charges + applied.amount


# --- public shapes -----------------------------------------------------------------------------------


class InvoiceLinePublic(Public):
    model_config = ConfigDict(title="InvoiceLine")

    object: Literal["line_item"]
    code: str
    plan: str | None
    description: str
    quantity: int
    unit_amount_decimal: str
    amount: int

    @classmethod
    def of(cls, line: Line | InvoiceLine) -> InvoiceLinePublic:
        unit = line.unit_amount_decimal  # a stored line holds the text written when its invoice was closed
        unit_text = unit if isinstance(unit, str) else decimal_text(unit, exponent=True)
        return cls(object="line_item", code=line.code, plan=line.plan, description=line.description,
                   quantity=line.quantity, unit_amount_decimal=unit_text, amount=line.amount)


class InvoicePublic(Public):
    """A closed period's invoice, or the running period's draft (``id`` None) as it stands now."""

    model_config = ConfigDict(title="Invoice")

    id: str | None  # None on the upcoming (draft) invoice
    object: Literal["invoice"]
    tenant_id: str
    period: str
    status: str
    currency: str
    period_start: int
    period_end: int
    created: int | None
    lines: Page[InvoiceLinePublic]
    subtotal: int
    total: int
    sync_status: str
    stripe_invoice_id: str | None
    paid_at: int | None

    @classmethod
    def of(cls, invoice: Invoice, lines: Sequence[InvoiceLine]) -> InvoicePublic:
        return cls(id=invoice.id, object="invoice", tenant_id=invoice.tenant_id, period=invoice.period,
                   status=invoice.status, currency=invoice.currency, period_start=invoice.period_start,
                   period_end=invoice.period_end, created=invoice.created,
                   lines=Page.of([InvoiceLinePublic.of(x) for x in lines]), subtotal=invoice.subtotal,
                   total=invoice.total, sync_status=invoice.sync_status, stripe_invoice_id=invoice.stripe_invoice_id,
                   paid_at=invoice.paid_at)


def preview(*, session: Session, catalog: PlanCatalog, tenant_id: str, plan: str, period: str | None = None
            ) -> InvoicePublic:
    """The running (or given, not yet closed) period's invoice as it stands now."""
    period = period or period_of(clock.now_s())
    start, end = period_bounds(period)
    lines, charges, total = invoice_lines(session=session, catalog=catalog, tenant_id=tenant_id, period=period,
                                          current_plan=plan)
    return InvoicePublic(
        id=None, object="invoice", tenant_id=tenant_id, period=period, status="draft",
        currency=catalog.get(plan).currency, period_start=start, period_end=end, created=None,
        lines=Page.of([InvoiceLinePublic.of(x) for x in lines]), subtotal=charges, total=total,
        sync_status="not_synced", stripe_invoice_id=None, paid_at=None,
    )


def lines_of(*, session: Session, invoice_id: str) -> list[InvoiceLine]:
    query = select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id).order_by(col(InvoiceLine.position))
    return list(session.exec(query).all())


def list_invoices(*, session: Session, tenant_id: str, limit: int, after: str | None) -> tuple[list[Invoice], bool]:
    query = select(Invoice).where(Invoice.tenant_id == tenant_id).order_by(col(Invoice.id).desc())
    if after:
        query = query.where(col(Invoice.id) < after)
    rows = list(session.exec(query.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


# --- closing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CloseResult:
    period: str
    invoices: int
    already_closed: bool
    closed_at: int
    returned_to: tuple[str, ...] = ()  # tenants given credits back (credits.return_overdraw): caches to forget



class BillingClosePublic(Public):
    """What ``POST /admin/billing/close`` did (``already_closed``: an earlier close's result, unchanged)."""

    model_config = ConfigDict(title="BillingClose")

    object: Literal["billing_close"]
    period: str
    invoices: int
    already_closed: bool
    closed_at: int

    @classmethod
    def of(cls, result: CloseResult) -> BillingClosePublic:
        return cls(object="billing_close", period=result.period, invoices=result.invoices,
                   already_closed=result.already_closed, closed_at=result.closed_at)


def close_period(*, sessions: sessionmaker[Session], catalog: PlanCatalog, period: str) -> CloseResult:
    """Close a finished month: one invoice per tenant that existed in it.

    Refuses a period that has not ended (409); a second close returns the first one's result unchanged.
    """
    start, end = period_bounds(parse_period(period))
    if end > clock.now_s():
        raise ConflictError(f"Period {period} has not ended yet.", code="period_not_ended", param="period")
    try:
        return _close(sessions, catalog, period, start, end)
    except IntegrityError:
        # Another close of the same period won the race (SQLite has no row lock): report it, change nothing.
        with sessions() as session:
            done = session.get(BillingClose, period)
            if done is None:
                raise
            return CloseResult(period, done.invoices, True, done.closed_at)


def _close(sessions: sessionmaker[Session], catalog: PlanCatalog, period: str, start: int, end: int) -> CloseResult:
    with sessions() as session:
        state = _lock_state(session)
        done = session.get(BillingClose, period)
        if done is not None:
            return CloseResult(period, done.invoices, True, done.closed_at)
        now = clock.now_s()
        existed = [t for t in all_tenants(session=session) if t.created < end]
        count, returned_to = 0, []
        for tenant in existed:
            written, returned = _invoice_tenant(session=session, catalog=catalog, tenant=tenant, period=period,
                                                start=start, end=end, now=now)
            count += written
            if returned:
                returned_to.append(tenant.id)
        session.add(BillingClose(period=period, closed_at=now, invoices=count))
        if state.closed_through is None or period > state.closed_through:
            state.closed_through = period
        session.add(state)
        session.commit()
        return CloseResult(period, count, False, now, tuple(returned_to))


def _lock_state(session: Session) -> BillingState:
    query = select(BillingState).where(BillingState.id == 1)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    state = session.exec(query).first()
    if state is None:
        state = BillingState(id=1)
        session.add(state)
        session.flush()
    return state


def _invoice_tenant(*, session: Session, catalog: PlanCatalog, tenant: Tenant, period: str,
                    start: int, end: int, now: int) -> tuple[int, bool]:
    """Write the tenant's invoice for the period (1) unless it exists (0); and whether credits went back."""
    tenant_id, plan = tenant.id, tenant.plan
    exists = session.exec(select(Invoice.id).where(Invoice.tenant_id == tenant_id, Invoice.period == period)).first()
    if exists is not None:
        return 0, False
    lines, charges, total = invoice_lines(session=session, catalog=catalog, tenant_id=tenant_id, period=period,
                                          current_plan=plan)
    invoice = Invoice(id=new_id("in"), tenant_id=tenant_id, period=period, currency=catalog.get(plan).currency,
                      subtotal=charges, total=total, period_start=start, period_end=end, created=now)
    session.add(invoice)
    for position, line in enumerate(lines):
        session.add(InvoiceLine(invoice_id=invoice.id, position=position, code=line.code, plan=line.plan,
                                description=line.description, quantity=line.quantity,
                                unit_amount_decimal=decimal_text(line.unit_amount_decimal, exponent=True),
                                amount=line.amount))
    session.flush()
    enqueue_invoice(session=session, invoice=invoice, has_lines=bool(lines))
    drawn = sum(credits.drawn_in_period(session=session, tenant_id=tenant_id, period=period).values())
    by_plan = usage_by_plan(session.connection(), tenant_id=tenant_id, period=period) if drawn else {}
    over = drawn - billed_spend_micro(catalog, by_plan, plan) if drawn else 0
    returned = credits.return_overdraw(session=session, tenant_id=tenant_id, period=period, over_micro=over, now=now)
    return 1, bool(returned)
