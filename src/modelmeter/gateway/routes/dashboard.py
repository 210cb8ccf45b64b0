"""The tenant dashboard: ``POST /v1/dashboard/links`` issues a short-lived signed link (``billing:read`` key);
``GET /dashboard?token=…`` renders that tenant's page. A forged, expired or malformed token gets 401 and no data."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from modelmeter.gateway.dashboard import DashboardLink, issue_link, load_page, verify_token
from modelmeter.gateway.dashboard_page import render
from modelmeter.gateway.deps import BillingPrincipal, ServicesDep
from modelmeter.gateway.schemas import TENANT_WRITE, errors
from modelmeter.gateway.services import Services

router = APIRouter(tags=["dashboard"])

# The token is in the URL: keep it out of caches and out of the Referer of anything the page links to.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
}


@router.post("/v1/dashboard/links", response_model=DashboardLink, responses=errors(*TENANT_WRITE))
async def create_link(principal: BillingPrincipal, services: ServicesDep, request: Request) -> DashboardLink:
    """A link to the caller's dashboard page, valid for ``MODELMETER_DASHBOARD_LINK_TTL_S`` seconds."""
    base = services.settings.public_url or bound_url(request)
    return issue_link(services.settings, principal.tenant_id, base)


def bound_url(request: Request) -> str:
    """The address this server answers on, from the socket, never from the client's Host header (issue 21: a
    forged Host made the link point at the attacker's server, which then received the tenant's token)."""
    scheme = request.scope.get("scheme", "http")
    host, port = request.scope.get("server") or ("127.0.0.1", 80)
    name = f"[{host}]" if ":" in str(host) else str(host)
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{name}" + ("" if port in (None, default) else f":{port}")


def _page(services: Services, tenant_id: str, expires_at: int, live: dict[str, int] | None) -> str:
    with services.sessions() as session:
        return render(load_page(session=session, catalog=services.plans, tenant_id=tenant_id, expires_at=expires_at,
                                live=live))


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard(services: ServicesDep, token: str = "") -> HTMLResponse:
    """The tenant's usage over time, spend against budget and plan, the upcoming and past invoices, and the
    prepaid credits (the balance as ``GET /v1/billing/credits`` shows it: draws in flight taken)."""
    tenant_id, expires_at = verify_token(services.settings, token)
    live = await services.quota.credit_balances(tenant_id)
    page = await asyncio.to_thread(_page, services, tenant_id, expires_at, live)
    return HTMLResponse(page, headers=_PAGE_HEADERS)
