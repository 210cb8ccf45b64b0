"""Plan simulation: a period's ledger re-priced as if candidate plans and assignments had been in force.

What it computes (``POST /admin/billing/simulate``, ``modelmeter billing simulate``; README "Plan simulation")
    For every tenant that existed in the period: its actual revenue, its revenue under the candidate catalog (the
    configured plans, with ``plans`` replacing those of the same id and adding new ones) and assignments, the
    compute cost of its usage, and both margins. Nothing is written: the work runs in its own session, read-only
    on PostgreSQL, and is rolled back.

Revenue (the unit economics view's, :mod:`modelmeter.billing.economics`)
    Actual revenue is ``economics.tenant_revenue``: the closed invoice's lines, or the preview's while the period
    is open, with credit-funded usage counted once at use (purchased credits' usage is revenue; of ``Credits
    applied`` only the part granted credits paid reduces it). Simulated revenue is the same sum over the lines
    the invoice would have had: ``invoicing.invoice_lines`` with the candidate catalog (plan history, prorated base
    fees, per-plan allowances, tiers, credits applied to the simulated usage charges and split by what each
    source drew). A tenant named in ``assign`` holds the assigned plan for all of its time in the period (every
    second a plan history gives it) and all its usage is priced under it, through the same ``price_period`` and
    ``credits_line``. With no plans and no assignments the simulated lines are the invoice's own, to the cent.
    The credits actually drawn are kept as they were: a cheaper plan would have drawn less, and ``credits_line``
    caps what is applied at the simulated usage charges.

Compute cost and totals
    Compute cost is the ledger's (``economics.ledger_tallies``), rounded half-up once per tenant; margins are
    revenue less compute cost. ``totals`` are the rows' cents summed, so they add up exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, field_validator
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter import clock
from modelmeter.billing import credits, economics, invoicing
from modelmeter.billing.catalog import Plan, PlanCatalog
from modelmeter.billing.periods import PERIOD, parse_period, period_bounds, period_of
from modelmeter.billing.pricing import Line, price_period, usage_cost_micro
from modelmeter.billing.spend import period_usage
from modelmeter.errors import ConflictError, InvalidRequestError
from modelmeter.fields import PYTHON_RE
from modelmeter.settings import Settings
from modelmeter.shapes import Public
from modelmeter.tenancy.tenants import Tenant, all_tenants

MAX_PLANS = 100
MAX_ASSIGNMENTS = 10_000
MONEY_FIELDS = ("revenue_actual_cents", "revenue_simulated_cents", "compute_cost_cents", "margin_actual_cents",
                "margin_simulated_cents")


class SimulationRequest(BaseModel):
    """``{"period": "YYYY-MM", "plans": [plan, ...], "assign": {tenant_id: plan_id}}``; each plan is validated as
    the catalog's are, so an error names it: ``plans.0.token_tiers.tiers.1.up_to``."""

    model_config = ConfigDict(extra="forbid", regex_engine=PYTHON_RE)

    period: Annotated[str, StringConstraints(pattern=PERIOD)]
    plans: Annotated[list[Plan], Field(max_length=MAX_PLANS)] = []
    assign: Annotated[dict[str, str], Field(max_length=MAX_ASSIGNMENTS)] = {}

    @field_validator("plans", mode="before")
    @classmethod
    def _strict_json(cls, value: Any) -> Any:
        """Plans as JSON states them, strictly: no ``1.0`` for an integer, no ``0`` for a boolean (a catalog file
        is the operator's; a request body must match its documented schema exactly)."""
        if not isinstance(value, list):
            return value
        return _PLANS.validate_json(json.dumps(value), strict=True)


_PLANS = TypeAdapter(list[Plan])


@dataclass(frozen=True, slots=True)
class SimulationRow:
    """One tenant's period, actual and simulated. ``invoice_total_simulated`` is what its invoice's total would
    have been (not part of the public shape; the tests compare it with the closed invoices)."""

    tenant_id: str
    plan_actual: str
    plan_simulated: str
    revenue_actual_cents: int
    revenue_simulated_cents: int
    compute_cost_cents: int
    invoice_total_simulated: int

    @property
    def margin_actual_cents(self) -> int:
        return self.revenue_actual_cents - self.compute_cost_cents

    @property
    def margin_simulated_cents(self) -> int:
        return self.revenue_simulated_cents - self.compute_cost_cents

    @property
    def margin_change_cents(self) -> int:
        return self.margin_simulated_cents - self.margin_actual_cents



@dataclass(frozen=True, slots=True)
class Simulation:
    period: str
    rows: list[SimulationRow]

    def totals(self) -> dict[str, int]:
        return {name: sum(getattr(row, name) for row in self.rows) for name in MONEY_FIELDS}



class SimulationFigures(Public):
    """Cents summed over the simulation's rows."""

    revenue_actual_cents: int
    revenue_simulated_cents: int
    compute_cost_cents: int
    margin_actual_cents: int
    margin_simulated_cents: int


class SimulationRowPublic(SimulationFigures):
    """One tenant: its plans in the period (``+``-joined when it changed) and the simulated one, both revenues
    (the unit economics view's), the compute cost and both margins."""

    model_config = ConfigDict(title="SimulationRow")

    tenant_id: str
    plan_actual: str
    plan_simulated: str

    @classmethod
    def of(cls, row: SimulationRow) -> SimulationRowPublic:
        return cls(tenant_id=row.tenant_id, plan_actual=row.plan_actual, plan_simulated=row.plan_simulated,
                   **{name: getattr(row, name) for name in MONEY_FIELDS})


class SimulationPublic(Public):
    """``POST /admin/billing/simulate``: each tenant's period re-priced, largest gain in margin first."""

    model_config = ConfigDict(title="Simulation")

    object: Literal["simulation"]
    period: str
    data: list[SimulationRowPublic]
    totals: SimulationFigures

    @classmethod
    def of(cls, simulation: Simulation) -> SimulationPublic:
        return cls(object="simulation", period=simulation.period,
                   data=[SimulationRowPublic.of(r) for r in simulation.rows],
                   totals=SimulationFigures(**simulation.totals()))


def candidate_catalog(catalog: PlanCatalog, plans: Sequence[Plan]) -> PlanCatalog:
    """The catalog with ``plans`` replacing those of the same id and the others added after (422 on a repeat)."""
    seen: set[str] = set()
    for i, plan in enumerate(plans):
        if plan.id in seen:
            raise InvalidRequestError(f"plans.{i}.id: plan '{plan.id}' appears more than once in plans.",
                                      code="duplicate_plan", param=f"plans.{i}.id")
        seen.add(plan.id)
    merged = {p.id: p for p in catalog.all()} | {p.id: p for p in plans}
    return PlanCatalog(list(merged.values()))


def _check_assign(assign: Mapping[str, str], tenants: Mapping[str, Tenant], catalog: PlanCatalog,
                  period: str) -> None:
    for tenant_id, plan in assign.items():
        param = f"assign.{tenant_id}"
        if tenant_id not in tenants:
            raise InvalidRequestError(f"{param}: no tenant '{tenant_id}' existed in {period}.",
                                      code="unknown_tenant", param=param)
        if plan not in catalog:
            raise InvalidRequestError(f"{param}: unknown plan '{plan}'. Known plans: "
                                      f"{', '.join(p.id for p in catalog.all())}.", code="unknown_plan", param=param)


def _assigned_lines(*, session: Session, catalog: PlanCatalog, tenant_id: str, period: str, plan_id: str
                    ) -> list[Line]:
    """A tenant's period on one plan: all the time it held any plan, all its usage, then credits applied."""
    start, end = period_bounds(period)
    held = sum(secs for _, secs in invoicing.plan_segments(session=session, tenant_id=tenant_id, start=start,
                                                            end=end))
    used = period_usage(session=session, tenant_id=tenant_id, period=period)
    plan = catalog.get(plan_id)
    lines = price_period([(plan, held, used)], seconds_in_period=end - start)
    applied = invoicing.credits_line(session=session, tenant_id=tenant_id, period=period, lines=lines,
                                     plan=plan_id, usage_micro=usage_cost_micro(plan, used))
    return lines if applied is None else [*lines, applied]


def _plans_held(*, session: Session, tenant: Tenant, period: str) -> str:
    start, end = period_bounds(period)
    segments = invoicing.plan_segments(session=session, tenant_id=tenant.id, start=start, end=end)
    return "+".join(plan for plan, _ in segments) or tenant.plan


def _revenue(lines: Sequence[Line], drawn: Mapping[str, int]) -> int:
    """Revenue as the economics view counts it: the charges, less what granted credits paid of ``Credits
    applied`` (purchased credits' usage is revenue in full)."""
    charges = sum(line.amount for line in lines if line.code != "credits")
    applied = -sum(line.amount for line in lines if line.code == "credits")
    return charges - credits.granted_share(applied, dict(drawn))


def _tenant_row(*, session: Session, catalog: PlanCatalog, candidate: PlanCatalog, tenant: Tenant, period: str,
                assigned: str | None, cost_cents: int) -> SimulationRow:
    actual_by_plan, _ = economics.tenant_revenue(session=session, catalog=catalog, tenant=tenant, period=period)
    if assigned is None:
        lines, _, _ = invoicing.invoice_lines(session=session, catalog=candidate, tenant_id=tenant.id,
                                              period=period, current_plan=tenant.plan)
    else:
        lines = _assigned_lines(session=session, catalog=candidate, tenant_id=tenant.id, period=period,
                                plan_id=assigned)
    drawn = credits.drawn_in_period(session=session, tenant_id=tenant.id, period=period)
    held = _plans_held(session=session, tenant=tenant, period=period)
    return SimulationRow(tenant.id, held, assigned or held, sum(actual_by_plan.values()), _revenue(lines, drawn),
                         cost_cents, sum(line.amount for line in lines))


def simulate(*, sessions: sessionmaker[Session], catalog: PlanCatalog, settings: Settings, period: str,
             plans: Sequence[Plan] = (), assign: Mapping[str, str] | None = None) -> Simulation:
    """Re-price ``period`` (closed or running) under ``plans`` and ``assign``; rows sorted by the change in margin,
    largest gain first, then tenant id. 422 for a bad period, a repeated plan id or a bad assignment; 409 for a
    period that has not started. Writes nothing."""
    parse_period(period)
    if period > period_of(clock.now_s()):
        raise ConflictError(f"Period {period} has not started yet.", code="period_in_future", param="period")
    candidate = candidate_catalog(catalog, plans)
    assign = assign or {}
    end = period_bounds(period)[1]
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SET TRANSACTION READ ONLY"))
        try:
            tenants = {t.id: t for t in all_tenants(session=session) if t.created < end}
            _check_assign(assign, tenants, candidate, period)
            prices = economics.compute_prices(settings)
            cost_units: dict[str, int] = {}
            for (tenant_id, _), tally in economics.ledger_tallies(session=session, period=period,
                                                                  prices=prices).items():
                cost_units[tenant_id] = cost_units.get(tenant_id, 0) + tally.cost_units
            rows = [_tenant_row(session=session, catalog=catalog, candidate=candidate, tenant=tenant, period=period,
                                assigned=assign.get(tenant_id),
                                cost_cents=economics.units_to_cents(cost_units.get(tenant_id, 0)))
                    for tenant_id, tenant in tenants.items()]
        finally:
            session.rollback()
    rows.sort(key=lambda r: (-r.margin_change_cents, r.tenant_id))
    return Simulation(period, rows)
