"""Unit economics: what each tenant and each plan earned in a period against the compute it cost.

Revenue
    A period's revenue is its invoice lines: the invoice's own lines once the period is closed, the preview's
    (``invoicing.invoice_lines``, credits applied as on the invoice) while it is open. Each line names the plan
    it was priced under, so a tenant that changed plan mid-period splits its revenue between the plans exactly
    as its invoice does.

Prepaid credits (counted once, at use)
    A credit purchase's own Stripe invoice is not revenue: the money is deferred until the credits pay for usage.
    Usage paid by *purchased* credits is revenue when it is incurred, at its full charges: the invoice's negative
    ``Credits applied`` line does not cancel it. *Granted* credits are a discount: usage they pay earns nothing,
    so revenue = the invoice's charges - the part of ``Credits applied`` that granted credits paid. The applied
    amount (the period's draws rounded half-up, capped at the usage charges) is split between the two sources in
    proportion to what each drew in the period (``credits.granted_share``: the granted part rounded half-up, the
    purchased part the rest), in integer cents; the granted part reduces the revenue of the plan the credits line
    names. Credits bought and not yet used are a liability, not revenue (``modelmeter_credits_outstanding_cents``).

Compute cost
    The ledger's ``compute_us`` (each request's share of its batch's forward time, and each training run's wall
    time) priced by the row's device: CPU time at ``cpu_core_hour`` per core-hour times the cores torch uses,
    accelerator time (``cuda``, anything not ``cpu``) at ``gpu_hour`` per GPU-hour.

Exactness
    Prices are decimal strings in the currency's major unit, converted once to integer micro-cents per hour.
    A cost is kept as the exact integer ``cost_units`` = micro-cents x microseconds per hour, so sums stay
    exact; it is rounded once, half-up, to integer cents (``compute_cost_cents``) when shown. No floats.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing import credits, invoicing, periods
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.counts import add_into
from modelmeter.billing.periods import period_bounds
from modelmeter.billing.spend import usage_of, usage_sums
from modelmeter.billing.tables import Invoice, UsageEvent
from modelmeter.errors import ConflictError
from modelmeter.money import MICRO_PER_CENT, decimal_text, quantize_half_up, round_half_up_div, unit_micro_cents
from modelmeter.settings import Settings
from modelmeter.shapes import Public
from modelmeter.tenancy.tenants import Tenant, all_tenants

US_PER_HOUR = 3_600_000_000
_UNITS_PER_CENT = US_PER_HOUR * MICRO_PER_CENT
GroupBy = Literal["tenant", "plan"]


@dataclass(frozen=True, slots=True)
class ComputePrices:
    """Compute prices as exact integer micro-cents per hour, and the CPU cores one unit of CPU time uses."""

    cpu_core_hour_micro: int
    gpu_hour_micro: int
    cores: int

    @classmethod
    def parse(cls, *, cpu_core_hour: str, gpu_hour: str, cores: int) -> ComputePrices:
        """Prices as decimal strings in the major unit (``"0.05"`` dollars per core-hour)."""
        if cores < 1:
            raise ValueError("cores must be at least 1")
        return cls(unit_micro_cents(Decimal(cpu_core_hour), 1), unit_micro_cents(Decimal(gpu_hour), 1), cores)

    def cost_units(self, device: str, compute_us: int) -> int:
        """The exact cost of ``compute_us`` on ``device``, in micro-cents x microseconds-per-hour."""
        if device == "cpu":
            return compute_us * self.cpu_core_hour_micro * self.cores
        return compute_us * self.gpu_hour_micro


def units_to_cents(units: int) -> int:
    """Cost units rounded half-up to integer cents."""
    return round_half_up_div(units, _UNITS_PER_CENT)


def units_to_decimal_cents(units: int) -> str:
    """Cost units as a decimal string of cents, to the micro-cent."""
    return decimal_text(quantize_half_up(units, _UNITS_PER_CENT, places=6))


@dataclass(slots=True)
class Tally:
    """Usage and compute of one group: counts, CPU and accelerator microseconds, exact cost units."""

    requests: int = 0
    tokens: int = 0
    training_tokens: int = 0
    cpu_us: int = 0
    gpu_us: int = 0
    cost_units: int = 0
    batch_requests: int = 0  # of ``requests``, Batch API lines
    batch_tokens: int = 0

    def add(self, other: Tally) -> None:
        """Add ``other`` field by field."""
        add_into(self, other)


@dataclass(slots=True)
class EconomicsRow:
    """One tenant, one plan, or one tenant on one plan: revenue, compute cost and margin in a period."""

    period: str
    currency: str
    tenant_id: str | None = None
    plan: str | None = None
    revenue_cents: int = 0
    revenue_source: str = "preview"
    usage: Tally = field(default_factory=Tally)
    plans: list[str] = field(default_factory=list)

    @property
    def compute_cost_cents(self) -> int:
        return units_to_cents(self.usage.cost_units)

    @property
    def margin_cents(self) -> int:
        return self.revenue_cents - self.compute_cost_cents

    def margin_ratio(self) -> str | None:
        """Margin over revenue as a 4-place decimal string; ``None`` without revenue."""
        if self.revenue_cents == 0:
            return None
        return decimal_text(quantize_half_up(self.margin_cents, self.revenue_cents, places=4))



class UnitEconomics(Public):
    """One row of ``GET /admin/economics`` (and ``modelmeter economics``): revenue against compute cost."""

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

    @classmethod
    def of(cls, row: EconomicsRow) -> UnitEconomics:
        """Only the grouping's own fields are set (the route answers with ``exclude_unset``)."""
        u = row.usage
        grouping: dict[str, Any] = {"tenant_id": row.tenant_id} if row.tenant_id is not None else {}
        grouping |= {"plan": row.plan} if row.plan is not None else {"plans": row.plans}
        return cls(object="unit_economics", period=row.period, **grouping, currency=row.currency,
                   revenue_cents=row.revenue_cents, revenue_source=row.revenue_source,
                   compute_cost_cents=row.compute_cost_cents,
                   compute_cost_cents_decimal=units_to_decimal_cents(u.cost_units), margin_cents=row.margin_cents,
                   margin_ratio=row.margin_ratio(), requests=u.requests, tokens=u.tokens,
                   training_tokens=u.training_tokens, cpu_compute_ms=u.cpu_us // 1000,
                   gpu_compute_ms=u.gpu_us // 1000)


# --- queries ---------------------------------------------------------------------------------------------


def ledger_tallies(*, session: Session, period: str, prices: ComputePrices) -> dict[tuple[str, str], Tally]:
    """Usage and compute of a period per (tenant, plan it was served under), from the ledger."""
    query = (
        sa_select(col(UsageEvent.tenant_id), col(UsageEvent.plan), col(UsageEvent.device), *usage_sums(),
                  func.sum(UsageEvent.compute_us))
        .where(col(UsageEvent.period) == period)
        .group_by(col(UsageEvent.tenant_id), col(UsageEvent.plan), col(UsageEvent.device))
    )
    tallies: dict[tuple[str, str], Tally] = {}
    for tenant_id, plan, device, *sums, compute_us in session.execute(query).all():
        us, cpu, used = int(compute_us or 0), device == "cpu", usage_of(sums)
        tally = Tally(used.requests, used.tokens, used.training_tokens, us if cpu else 0, 0 if cpu else us,
                      prices.cost_units(device, us), used.batch_requests, used.batch_tokens)
        tallies.setdefault((tenant_id, plan), Tally()).add(tally)
    return tallies


def tenant_revenue(*, session: Session, catalog: PlanCatalog, tenant: Tenant, period: str
                   ) -> tuple[dict[str, int], str]:
    """Revenue cents per plan and its source: the closed invoice's lines, else the preview's; of their ``Credits
    applied`` line only the part granted credits paid (purchased credits' usage is revenue in full)."""
    invoice = session.exec(
        select(Invoice).where(Invoice.tenant_id == tenant.id, Invoice.period == period)
    ).first()
    if invoice is not None:
        lines: Iterable[Any] = invoicing.lines_of(session=session, invoice_id=invoice.id)
        source = "invoice"
    else:
        lines, _, _ = invoicing.invoice_lines(session=session, catalog=catalog, tenant_id=tenant.id, period=period,
                                              current_plan=tenant.plan)
        source = "preview"
    revenue: dict[str, int] = {}
    for line in lines:
        amount = line.amount
        if line.code == "credits":
            drawn = credits.drawn_in_period(session=session, tenant_id=tenant.id, period=period)
            amount = -credits.granted_share(-line.amount, drawn)
            if amount == 0:
                continue
        revenue[line.plan] = revenue.get(line.plan, 0) + amount
    return revenue, source


def period_economics(*, session: Session, catalog: PlanCatalog, prices: ComputePrices, period: str,
                     tenants: Sequence[Tenant]) -> list[EconomicsRow]:
    """One row per (tenant, plan) with revenue or usage in ``period``, for tenants that existed in it."""
    periods.parse_period(period)
    end = period_bounds(period)[1]
    tallies = ledger_tallies(session=session, period=period, prices=prices)
    rows: list[EconomicsRow] = []
    for tenant in (t for t in tenants if t.created < end):
        revenue, source = tenant_revenue(session=session, catalog=catalog, tenant=tenant, period=period)
        used = {plan or tenant.plan: tally for (tid, plan), tally in tallies.items() if tid == tenant.id}
        for plan in sorted(set(revenue) | set(used)):
            row = EconomicsRow(period, catalog.get(plan).currency if plan in catalog else "usd", tenant.id, plan,
                               revenue.get(plan, 0), source)
            row.usage.add(used.get(plan, Tally()))
            rows.append(row)
    return rows


# --- grouping --------------------------------------------------------------------------------------------


def _merge(into: EconomicsRow, row: EconomicsRow) -> None:
    into.revenue_cents += row.revenue_cents
    into.usage.add(row.usage)
    if row.revenue_source != into.revenue_source:
        into.revenue_source = "mixed"
    if row.plan is not None and row.plan not in into.plans:
        into.plans.append(row.plan)


def group(rows: Iterable[EconomicsRow], by: GroupBy) -> list[EconomicsRow]:
    """Rows summed per tenant (with the plans it was on) or per plan."""
    out: dict[str, EconomicsRow] = {}
    for row in rows:
        key = (row.tenant_id if by == "tenant" else row.plan) or ""
        if key not in out:
            first = EconomicsRow(row.period, row.currency, revenue_source=row.revenue_source)
            out[key] = replace(first, tenant_id=row.tenant_id, plans=[]) if by == "tenant" else replace(
                first, plan=row.plan)
        _merge(out[key], row)
    return list(out.values())


def total(rows: Iterable[EconomicsRow], period: str, currency: str = "usd") -> EconomicsRow:
    """Everything summed (the CLI's last line)."""
    out = EconomicsRow(period, currency, plan="(all)")
    for row in rows:
        out.revenue_cents += row.revenue_cents
        out.usage.add(row.usage)
    return out


# --- the operator's report ------------------------------------------------------------------------------


def compute_prices(settings: Settings) -> ComputePrices:
    """The configured compute prices; CPU time is multiplied by the torch threads the process runs."""
    cores = settings.torch_threads or os.cpu_count() or 1
    return ComputePrices.parse(cpu_core_hour=settings.cpu_core_hour_cost, gpu_hour=settings.gpu_hour_cost,
                               cores=cores)


def economics_report(*, session: Session, catalog: PlanCatalog, settings: Settings, period: str | None,
                     group_by: GroupBy) -> list[EconomicsRow]:
    """Revenue, compute cost and margin of ``period`` (the running month when omitted) per tenant or plan."""
    current = periods.period_of(clock.now_s())
    period = periods.parse_period(period) if period else current
    if period > current:
        # 409 like closing an unfinished month: the request is well formed, the period is not there yet.
        raise ConflictError(f"Period {period} has not started yet.", code="period_in_future", param="period")
    rows = period_economics(session=session, catalog=catalog, prices=compute_prices(settings), period=period,
                            tenants=all_tenants(session=session))
    ordered = group(rows, group_by)
    return sorted(ordered, key=lambda r: (-r.margin_cents, r.tenant_id or r.plan or ""))
