"""Every request dependency, declared once as an ``Annotated`` alias."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from modelmeter.errors import AuthenticationError, PermissionDeniedError
from modelmeter.gateway.auth import (
    INVALID_KEY_MESSAGE,
    Principal,
    admin_token_matches,
    parse_bearer,
)
from modelmeter.gateway.middleware import INTERNAL_PRINCIPAL, refuse_media_type
from modelmeter.gateway.services import Services
from modelmeter.settings import Settings
from modelmeter.tenancy.keys import well_formed


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs plain-def dependencies in a thread pool, a hop the hot path cannot afford.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings_dep(services: ServicesDep) -> Settings:
    return services.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    """A read session per request (writes go through service functions, which own their transactions)."""
    with services.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _bearer(request: Request) -> str:
    for value in request.query_params.values():
        if value.startswith(("mm_", "mmadmin_")):
            raise AuthenticationError(
                "API keys are never accepted in the query string; use 'Authorization: Bearer <key>'.",
                code="key_in_query",
            )
    token = parse_bearer(request.headers.get("authorization"))
    if token is None:
        raise AuthenticationError(
            "Missing API key; pass it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    return token


async def principal_of(services: Services, token: str) -> Principal | None:
    """The principal of a tenant key (cached, else looked up off the event loop); None for an unknown one."""
    if not well_formed(token):
        return None
    hit, principal = services.auth.cached(token)
    if not hit:
        principal = await run_in_threadpool(services.auth.load, token)
    return principal


def _address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


async def current_principal(request: Request, services: ServicesDep) -> Principal:
    """Authenticate the tenant key: malformed, unknown, revoked and expired keys get one 401 message (and count
    against the caller's address: past the limit, 429 before any lookup; a valid cached key is never held).
    A batch line served in-process carries its principal in the scope instead (``auth.INTERNAL_PRINCIPAL``)."""
    internal = request.scope.get(INTERNAL_PRINCIPAL)
    if isinstance(internal, Principal):
        request.state.principal = internal
        return internal
    token = _bearer(request)
    hit, cached = services.auth.cached(token) if well_formed(token) else (False, None)
    if not (hit and cached is not None):
        services.failed_auth.check(_address(request))
    try:
        principal = services.auth.check(cached if hit else await principal_of(services, token))
    except AuthenticationError:
        services.failed_auth.failed(_address(request))
        raise
    request.state.principal = principal
    refuse_media_type(request.state)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def scoped(scope: str) -> Callable[..., Any]:
    async def dependency(principal: CurrentPrincipal) -> Principal:
        principal.require(scope)
        return principal

    return dependency


InferencePrincipal = Annotated[Principal, Depends(scoped("inference"))]
FineTunePrincipal = Annotated[Principal, Depends(scoped("fine-tune"))]
BillingPrincipal = Annotated[Principal, Depends(scoped("billing:read"))]
BillingWritePrincipal = Annotated[Principal, Depends(scoped("billing:write"))]


async def require_admin(request: Request, services: ServicesDep) -> None:
    """The admin token passes; a working tenant key gets 403; anything else 401."""
    token = _bearer(request)
    expected = services.settings.admin_token
    if expected and admin_token_matches(token, expected):
        refuse_media_type(request.state)
        return
    services.failed_auth.check(_address(request))
    principal = await principal_of(services, token)
    if principal is not None:
        services.auth.check(principal)
        raise PermissionDeniedError("Tenant API keys cannot call admin endpoints.", code="admin_only")
    services.failed_auth.failed(_address(request))
    raise AuthenticationError(INVALID_KEY_MESSAGE)


AdminDep = Depends(require_admin)


class ListParams:
    """``?limit=&after=`` cursor pagination, newest first (ids sort by creation)."""

    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[str | None, Query(max_length=128)] = None,
    ) -> None:
        self.limit = limit
        self.after = after


ListDep = Annotated[ListParams, Depends()]
