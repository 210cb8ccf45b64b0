"""Usage alerts and events: the tenant's settings (``/v1/billing/alerts``), and its events (``GET /v1/events``): the
thresholds its usage crossed, and its batches that ended. Each event is also POSTed to the alert URL, if one is set
(the ``webhooks`` of the OpenAPI document, declared in ``app.py`` with the functions at the end of this module)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from modelmeter.billing import alerts
from modelmeter.billing.alerts import AlertSettingsCreated, AlertSettingsPublic, EventDeliveryPublic, EventPublic
from modelmeter.errors import InvalidRequestError
from modelmeter.gateway.deps import AdminDep, BillingPrincipal, BillingWritePrincipal, ListDep, ServicesDep, SessionDep
from modelmeter.gateway.schemas import ADMIN_READ, ADMIN_WRITE, TENANT_READ, TENANT_WRITE, errors
from modelmeter.settings import ensure_admin_token
from modelmeter.shapes import Page

router = APIRouter(tags=["events"])
admin_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.put("/v1/billing/alerts", response_model=AlertSettingsCreated, responses=errors(*TENANT_WRITE))
def put_alerts(data: alerts.AlertSettingsUpdate, principal: BillingWritePrincipal,
               services: ServicesDep) -> AlertSettingsCreated:
    """Set the thresholds (percent of the monthly budget, or of the plan's included tokens when no budget is set)
    and the URL events are POSTed to. Each call makes a new signing secret, shown only in this response."""
    if not services.settings.alerts_allow_private_urls and alerts.private_address(data.url):
        raise InvalidRequestError("url must point at a public address, not a loopback, private or link-local one.",
                                  code="invalid_url", param="url")
    sealer = alerts.secret_sealer(ensure_admin_token(services.settings)[0])
    with services.sessions() as session:
        body = alerts.put_settings(session=session, tenant_id=principal.tenant_id, data=data, sealer=sealer)
    if services.alert_hook is not None:
        services.alert_hook.add(principal.tenant_id)  # this process's ledger fires for it from now on
    return body


@router.delete("/v1/billing/alerts", response_model=AlertSettingsPublic, responses=errors(*TENANT_WRITE))
def delete_alerts(principal: BillingWritePrincipal, services: ServicesDep) -> AlertSettingsPublic:
    """Remove the alert settings: no event is sent from now on, and deliveries still pending are given up."""
    with services.sessions() as session:
        body = alerts.delete_settings(session=session, tenant_id=principal.tenant_id)
    if services.alert_hook is not None:
        services.alert_hook.discard(principal.tenant_id)
    return body


@router.get("/v1/billing/alerts", response_model=AlertSettingsPublic, responses=errors(*TENANT_READ))
def get_alerts(principal: BillingPrincipal, session: SessionDep) -> AlertSettingsPublic:
    return alerts.get_settings(session=session, tenant_id=principal.tenant_id)


@router.get("/v1/events", response_model=Page[EventPublic], responses=errors(*TENANT_READ))
def list_events(principal: BillingPrincipal, session: SessionDep, page: ListDep) -> Page[EventPublic]:
    """The tenant's events (``usage.threshold_crossed``, ``batch.completed``, ``batch.failed``), newest first."""
    rows, has_more = alerts.list_events(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                        after=page.after)
    return Page.of([EventPublic.of(row) for row in rows], has_more)


@admin_router.get("/events/deliveries", response_model=Page[EventDeliveryPublic], responses=errors(*ADMIN_READ))
def list_deliveries(session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    after: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")] = None,
                    status: Annotated[Literal["pending", "done", "failed"] | None, Query()] = None,
                    ) -> Page[EventDeliveryPublic]:
    """Alert deliveries, newest first (``after``: a delivery id, the cursor); ``?status=failed``: those the relay
    gave up on (receivers to look at)."""
    rows, has_more = alerts.list_deliveries(session=session, status=status, limit=limit,
                                            after=None if after is None else int(after))
    return Page.of([EventDeliveryPublic.of(row) for row in rows], has_more)


@admin_router.post("/events/deliveries/{delivery_id}/retry", response_model=EventDeliveryPublic,
                   responses=errors(*ADMIN_WRITE, 404, 409))
def retry_delivery(delivery_id: Annotated[str, Path(pattern=r"^[0-9]{1,18}$")],
                   services: ServicesDep) -> EventDeliveryPublic:
    """Send a ``failed`` delivery again from its first attempt (after the receiver is fixed); 409 otherwise."""
    with services.sessions() as session:
        return EventDeliveryPublic.of(alerts.retry_delivery(session=session, delivery_id=int(delivery_id)))


def usage_threshold_crossed(body: EventPublic) -> None:
    """What the alert relay POSTs to the tenant's URL when a threshold is crossed: the event exactly as
    ``GET /v1/events`` lists it (one model), as compact JSON. The ``modelmeter-signature`` header signs the body
    (``t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`` with the secret shown when the alerts were set); a 2xx
    answer is a delivery, anything else is retried with backoff."""


def batch_completed(body: EventPublic) -> None:
    """What the alert relay POSTs to the tenant's URL (when one is set) when a batch completes: the event as
    ``GET /v1/events`` lists it, ``data`` the batch's id, status, request counts and output and error files. Signed
    and retried as ``usage.threshold_crossed`` is."""


def batch_failed(body: EventPublic) -> None:
    """What the alert relay POSTs to the tenant's URL (when one is set) when a batch fails (a line refused for
    quota, or its input file lost): ``data`` as for ``batch.completed``; ``GET /v1/batches/{id}`` says why. Signed
    and retried as ``usage.threshold_crossed`` is."""
