"""Usage alerts: the tenant's settings (``/v1/billing/alerts``) and the events they fired (``GET /v1/events``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from modelmeter.billing import alerts
from modelmeter.errors import InvalidRequestError
from modelmeter.gateway.deps import (
    AdminDep,
    BillingPrincipal,
    BillingWritePrincipal,
    ListDep,
    ServicesDep,
    SessionDep,
    list_body,
)
from modelmeter.gateway.schemas import (
    ADMIN_READ,
    TENANT_READ,
    TENANT_WRITE,
    AlertSettings,
    AlertSettingsCreated,
    Event,
    EventDelivery,
    Page,
    errors,
)

router = APIRouter(tags=["events"])
admin_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.put("/v1/billing/alerts", response_model=AlertSettingsCreated, responses=errors(*TENANT_WRITE))
def put_alerts(data: alerts.AlertSettingsUpdate, principal: BillingWritePrincipal,
               services: ServicesDep) -> dict[str, Any]:
    """Set the thresholds (percent of the monthly budget, or of the plan's included tokens when no budget is set)
    and the URL events are POSTed to. Each call makes a new signing secret, shown only in this response."""
    if not services.settings.alerts_allow_private_urls and alerts.private_address(data.url):
        raise InvalidRequestError("url must point at a public address, not a loopback, private or link-local one.",
                                  code="invalid_url", param="url")
    with services.sessions() as session:
        body = alerts.put_settings(session=session, tenant_id=principal.tenant_id, data=data)
    if services.alert_hook is not None:
        services.alert_hook.add(principal.tenant_id)  # this process's ledger fires for it from now on
    return body


@router.get("/v1/billing/alerts", response_model=AlertSettings, responses=errors(*TENANT_READ))
def get_alerts(principal: BillingPrincipal, session: SessionDep) -> dict[str, Any]:
    return alerts.get_settings(session=session, tenant_id=principal.tenant_id)


@router.get("/v1/events", response_model=Page[Event], responses=errors(*TENANT_READ))
def list_events(principal: BillingPrincipal, session: SessionDep, page: ListDep) -> dict[str, Any]:
    """The tenant's events (``usage.threshold_crossed``), newest first."""
    rows, has_more = alerts.list_events(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                        after=page.after)
    return list_body([alerts.event_public(row) for row in rows], has_more)


@admin_router.get("/events/deliveries", response_model=Page[EventDelivery], responses=errors(*ADMIN_READ))
def list_deliveries(session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    after: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")] = None,
                    status: Annotated[Literal["pending", "done", "failed"] | None, Query()] = None) -> dict[str, Any]:
    """Alert deliveries, newest first (``after``: a delivery id, the cursor); ``?status=failed``: those the relay
    gave up on (receivers to look at)."""
    rows, has_more = alerts.list_deliveries(session=session, status=status, limit=limit,
                                            after=None if after is None else int(after))
    return list_body([alerts.delivery_public(row) for row in rows], has_more)
