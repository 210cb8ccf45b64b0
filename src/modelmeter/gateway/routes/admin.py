"""Operator API: tenants, keys and plans (admin token only). Every rule lives in :mod:`modelmeter.ops`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, ConfigDict, StringConstraints

from modelmeter import clock
from modelmeter.billing.catalog import Plan
from modelmeter.billing.credits import CreditGrantCreate, CreditGrantPublic, CreditList, grant_credits
from modelmeter.billing.economics import UnitEconomics, economics_report
from modelmeter.billing.invoicing import BillingClosePublic, close_period
from modelmeter.billing.periods import PERIOD
from modelmeter.billing.simulation import SimulationPublic, SimulationRequest, simulate
from modelmeter.fields import PYTHON_RE, matching
from modelmeter.gateway.deps import AdminDep, ListDep, ServicesDep, SessionDep
from modelmeter.gateway.schemas import ADMIN_READ, ADMIN_WRITE, errors
from modelmeter.ops import credits as credit_ops
from modelmeter.ops import tenants as ops
from modelmeter.shapes import Page, Public
from modelmeter.tenancy.keys import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ApiKeyRoll
from modelmeter.tenancy.tenants import TenantCreate, TenantPublic, TenantUpdate

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])

READ, ONE, WRITE, WRITE_ONE = (errors(*ADMIN_READ), errors(*ADMIN_READ, 404), errors(*ADMIN_WRITE),
                               errors(*ADMIN_WRITE, 404))

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
    low_rows: int  # rows served at low priority (Batch API lines), behind interactive ones
    queue_rows: int
    adapters_resident: int
    dropped_messages: int


class EngineStatus(Public):
    """``GET /admin/engine``: the fronts the engines have heard from, and every engine."""

    fronts: list[EngineFront]
    engines: list[EngineReport]


@router.get("/engine", response_model=EngineStatus, responses=READ)
async def get_engine(services: ServicesDep) -> EngineStatus:
    """The fronts and engines serving inference, with each engine's batch and row counters."""
    fronts, engines = await services.engines.stats()
    hidden = ("rid", "fronts")  # the wire's request id; the fronts are listed once, above
    return EngineStatus(
        fronts=[EngineFront(pid=pid) for pid in fronts],
        engines=[EngineReport(**{k: v for k, v in msgspec.structs.asdict(e).items() if k not in hidden})
                 for e in engines])


@router.post("/tenants", status_code=201, response_model=TenantPublic, responses=WRITE)
def post_tenant(data: TenantCreate, services: ServicesDep) -> Any:
    return ops.create_tenant(sessions=services.sessions, catalog=services.plans, data=data)


@router.get("/tenants", response_model=Page[TenantPublic], responses=READ)
def get_tenants(services: ServicesDep, page: ListDep) -> Page[TenantPublic]:
    rows, has_more = ops.list_tenants(sessions=services.sessions, limit=page.limit, after=page.after)
    return Page.of([TenantPublic.model_validate(t) for t in rows], has_more)


@router.get("/tenants/{tenant_id}", response_model=TenantPublic, responses=ONE)
def get_one_tenant(tenant_id: str, services: ServicesDep) -> Any:
    return ops.get_tenant(sessions=services.sessions, tenant_id=tenant_id)


@router.patch("/tenants/{tenant_id}", response_model=TenantPublic, responses=WRITE_ONE)
def patch_tenant(tenant_id: str, data: TenantUpdate, services: ServicesDep) -> Any:
    tenant = ops.update_tenant(sessions=services.sessions, catalog=services.plans, tenant_id=tenant_id, data=data)
    services.forget_tenant(tenant_id)
    return tenant


@router.post("/tenants/{tenant_id}/credits", status_code=201, response_model=CreditGrantPublic, responses=WRITE_ONE)
def post_credits(tenant_id: str, data: CreditGrantCreate, services: ServicesDep) -> Any:
    """Grant prepaid credits: they pay the tenant's usage as it is incurred, from the next request on."""
    granted = grant_credits(sessions=services.sessions, tenant_id=tenant_id, data=data)
    services.forget_tenant(tenant_id)  # the new credits epoch, at once, on every replica
    return granted


@router.get("/tenants/{tenant_id}/credits", response_model=CreditList, responses=ONE)
async def get_credits(tenant_id: str, services: ServicesDep, page: ListDep) -> Any:
    live = await services.quota.credit_balances(tenant_id)
    return await asyncio.to_thread(credit_ops.list_credits, sessions=services.sessions, tenant_id=tenant_id,
                                   limit=page.limit, after=page.after, live=live)


@router.post("/tenants/{tenant_id}/keys", status_code=201, response_model=ApiKeyCreated, responses=WRITE_ONE)
def post_key(tenant_id: str, services: ServicesDep, data: ApiKeyCreate | None = Body(None)) -> Any:
    row, plaintext = ops.issue_key(sessions=services.sessions, tenant_id=tenant_id, data=data or ApiKeyCreate())
    return ApiKeyCreated.of_new(row, plaintext, now=clock.now_s())


@router.get("/tenants/{tenant_id}/keys", response_model=Page[ApiKeyPublic], responses=ONE)
def get_keys(tenant_id: str, services: ServicesDep, page: ListDep) -> Page[ApiKeyPublic]:
    services.auth.flush_last_used()
    rows, has_more = ops.list_keys(sessions=services.sessions, tenant_id=tenant_id, limit=page.limit,
                                   after=page.after)
    now = clock.now_s()
    return Page.of([ApiKeyPublic.of(k, now=now) for k in rows], has_more)


@router.delete("/keys/{key_id}", response_model=ApiKeyPublic, responses=ONE)
def delete_key(key_id: str, services: ServicesDep) -> Any:
    key = ops.revoke_key(sessions=services.sessions, key_id=key_id)
    services.forget_key(key_id)
    return ApiKeyPublic.of(key, now=clock.now_s())


@router.post("/keys/{key_id}/roll", status_code=201, response_model=ApiKeyCreated, responses=WRITE_ONE)
def post_roll(
    key_id: str, services: ServicesDep, data: ApiKeyRoll | None = Body(None)
) -> Any:
    grace = data.grace_period_seconds if data and data.grace_period_seconds is not None else None
    new, plaintext = ops.roll_key(sessions=services.sessions, key_id=key_id,
                                  grace_s=services.settings.default_key_grace_s if grace is None else grace)
    services.forget_key(key_id)
    return ApiKeyCreated.of_new(new, plaintext, now=clock.now_s())


class CloseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", regex_engine=PYTHON_RE)
    period: Annotated[str, StringConstraints(pattern=PERIOD)]


@router.post("/billing/close", response_model=BillingClosePublic, responses=WRITE)
def post_close(data: CloseRequest, services: ServicesDep) -> BillingClosePublic:
    """Close a finished month into one invoice per tenant; closing it again changes nothing."""
    result = close_period(sessions=services.sessions, catalog=services.plans, period=data.period)
    for tenant_id in result.returned_to:  # credits given back: the next request loads the new grants
        services.forget_tenant(tenant_id)
    return BillingClosePublic.of(result)


@router.post("/billing/simulate", response_model=SimulationPublic, responses=errors(*ADMIN_WRITE))
def post_simulate(data: SimulationRequest, services: ServicesDep) -> SimulationPublic:
    """Re-price a period's ledger (closed or running) under candidate plans and assignments; writes nothing."""
    return SimulationPublic.of(simulate(sessions=services.sessions, catalog=services.plans, settings=services.settings,
                                        period=data.period, plans=data.plans, assign=data.assign))


@router.get("/plans", response_model=Page[Plan], responses=READ)
def get_plans(services: ServicesDep) -> Page[Plan]:
    return Page.of(services.plans.all())


@router.get("/economics", response_model=Page[UnitEconomics], response_model_exclude_unset=True,
            responses=errors(*ADMIN_READ, 409))
def get_economics(
    services: ServicesDep, session: SessionDep,
    period: Annotated[str | None, Query(json_schema_extra={"pattern": PERIOD}), matching(PERIOD)] = None,
    group_by: Literal["tenant", "plan"] = "tenant",
) -> Page[UnitEconomics]:
    """Revenue (invoices; the preview while open) against compute cost, and the margin, per tenant or plan."""
    rows = economics_report(session=session, catalog=services.plans, settings=services.settings, period=period,
                            group_by=group_by)
    return Page.of([UnitEconomics.of(r) for r in rows])
