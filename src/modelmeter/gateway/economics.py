"""Operator economics glue shared by the admin API, the CLI and the metrics collector: the gateway's tenants
and settings fed to :mod:`modelmeter.billing.economics` (which never imports the gateway)."""

from __future__ import annotations

import os

from sqlmodel import Session, select

from modelmeter import clock
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.economics import ComputePrices, EconomicsRow, GroupBy, TenantRef, group, period_economics
from modelmeter.billing.invoicing import parse_period
from modelmeter.billing.metering import period_of
from modelmeter.errors import InvalidRequestError
from modelmeter.gateway.tenants import Tenant
from modelmeter.settings import Settings


def compute_prices(settings: Settings) -> ComputePrices:
    """The configured compute prices; CPU time is multiplied by the torch threads the process runs."""
    cores = settings.torch_threads or os.cpu_count() or 1
    return ComputePrices.parse(cpu_core_hour=settings.cpu_core_hour_cost, gpu_hour=settings.gpu_hour_cost,
                               cores=cores)


def tenant_refs(session: Session) -> list[TenantRef]:
    """Every tenant, as billing sees it."""
    rows = session.exec(select(Tenant)).all()
    return [TenantRef(t.id, t.plan, t.created, t.monthly_budget_cents, t.status) for t in rows]


def economics_report(*, session: Session, catalog: PlanCatalog, settings: Settings, period: str | None,
                     group_by: GroupBy) -> list[EconomicsRow]:
    """Revenue, compute cost and margin of ``period`` (the running month when omitted) per tenant or plan."""
    current = period_of(clock.now_s())
    period = parse_period(period) if period else current
    if period > current:
        raise InvalidRequestError(f"Period {period} has not started yet.", code="period_in_future", param="period")
    rows = period_economics(session, catalog, compute_prices(settings), period, tenant_refs(session))
    ordered = group(rows, group_by)
    return sorted(ordered, key=lambda r: (-r.margin_cents, r.tenant_id or r.plan or ""))
