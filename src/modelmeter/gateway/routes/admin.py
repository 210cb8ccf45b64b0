"""Operator API: tenants, keys and plans (admin token only)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, ConfigDict, StringConstraints

from modelmeter import clock
from modelmeter.errors import ConflictError
from modelmeter.gateway import auth
from modelmeter.gateway.billing_ops import close_billing_period
from modelmeter.gateway.deps import AdminDep, ListDep, ServicesDep, SessionDep, list_body
from modelmeter.gateway.economics import economics_report
from modelmeter.gateway.tenants import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    ApiKeyRoll,
    TenantCreate,
    TenantPublic,
    TenantUpdate,
    create_tenant,
    get_key,
    get_tenant,
    list_keys,
    list_tenants,
    update_tenant,
)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.post("/tenants", status_code=201, response_model=TenantPublic)
def post_tenant(data: TenantCreate, session: SessionDep, services: ServicesDep) -> Any:
    services.plans.get(data.plan)
    tenant = create_tenant(session=session, data=data)
    session.commit()
    return tenant


@router.get("/tenants")
def get_tenants(session: SessionDep, page: ListDep) -> dict[str, Any]:
    rows, has_more = list_tenants(session=session, limit=page.limit, after=page.after)
    return list_body([TenantPublic.model_validate(t) for t in rows], has_more)


@router.get("/tenants/{tenant_id}", response_model=TenantPublic)
def get_one_tenant(tenant_id: str, session: SessionDep) -> Any:
    return get_tenant(session=session, tenant_id=tenant_id)


@router.patch("/tenants/{tenant_id}", response_model=TenantPublic)
def patch_tenant(tenant_id: str, data: TenantUpdate, session: SessionDep, services: ServicesDep) -> Any:
    tenant = get_tenant(session=session, tenant_id=tenant_id)
    if data.plan is not None:
        services.plans.get(data.plan)
    tenant = update_tenant(session=session, tenant=tenant, data=data)
    session.commit()
    services.auth.invalidate(lambda p: p.tenant_id == tenant_id)
    return tenant


@router.post("/tenants/{tenant_id}/keys", status_code=201, response_model=ApiKeyCreated)
def post_key(tenant_id: str, session: SessionDep, data: ApiKeyCreate | None = Body(None)) -> Any:
    get_tenant(session=session, tenant_id=tenant_id)
    row, plaintext = auth.issue_key(session=session, tenant_id=tenant_id, data=data or ApiKeyCreate())
    session.commit()
    return ApiKeyCreated(**ApiKeyPublic.of(row, now=clock.now_s()).model_dump(), key=plaintext)


@router.get("/tenants/{tenant_id}/keys")
def get_keys(tenant_id: str, session: SessionDep, services: ServicesDep, page: ListDep) -> dict[str, Any]:
    get_tenant(session=session, tenant_id=tenant_id)
    services.auth.flush_last_used()
    rows, has_more = list_keys(session=session, tenant_id=tenant_id, limit=page.limit, after=page.after)
    now = clock.now_s()
    return list_body([ApiKeyPublic.of(k, now=now) for k in rows], has_more)


@router.delete("/keys/{key_id}", response_model=ApiKeyPublic)
def delete_key(key_id: str, session: SessionDep, services: ServicesDep) -> Any:
    key = auth.revoke_key(session=session, key=get_key(session=session, key_id=key_id))
    session.commit()
    services.auth.invalidate(lambda p: p.key_id == key_id)
    return ApiKeyPublic.of(key, now=clock.now_s())


@router.post("/keys/{key_id}/roll", status_code=201, response_model=ApiKeyCreated)
def post_roll(
    key_id: str, session: SessionDep, services: ServicesDep, data: ApiKeyRoll | None = Body(None)
) -> Any:
    key = get_key(session=session, key_id=key_id)
    if key.status_at(clock.now_s()) != "active":
        raise ConflictError("Only an active key can be rolled.", code="key_not_active")
    grace = data.grace_period_seconds if data and data.grace_period_seconds is not None else None
    new, plaintext = auth.roll_key(
        session=session, key=key, grace_s=services.settings.default_key_grace_s if grace is None else grace
    )
    session.commit()
    services.auth.invalidate(lambda p: p.key_id == key_id)
    return ApiKeyCreated(**ApiKeyPublic.of(new, now=clock.now_s()).model_dump(), key=plaintext)


class CloseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    period: Annotated[str, StringConstraints(max_length=7)]


@router.post("/billing/close")
def post_close(data: CloseRequest, services: ServicesDep) -> dict[str, Any]:
    """Close a finished month into one invoice per tenant; closing it again changes nothing."""
    return close_billing_period(services, data.period).public()


@router.get("/plans")
def get_plans(services: ServicesDep) -> dict[str, Any]:
    return list_body([p.model_dump(mode="json") for p in services.plans.all()], False)


@router.get("/economics")
def get_economics(
    services: ServicesDep, session: SessionDep, period: Annotated[str | None, Query(max_length=7)] = None,
    group_by: Literal["tenant", "plan"] = "tenant",
) -> dict[str, Any]:
    """Revenue (invoices; the preview while open) against compute cost, and the margin, per tenant or plan."""
    rows = economics_report(session=session, catalog=services.plans, settings=services.settings, period=period,
                            group_by=group_by)
    return list_body([r.public() for r in rows], False)
