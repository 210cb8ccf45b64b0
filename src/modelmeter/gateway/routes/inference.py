"""Tenant inference routes: the model list (serving routes join it as they land)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from modelmeter.gateway.deps import CurrentPrincipal, ServicesDep, list_body

router = APIRouter(tags=["inference"])


@router.get("/v1/models")
async def get_models(principal: CurrentPrincipal, services: ServicesDep) -> dict[str, Any]:
    """The tenant's own models plus the platform's."""
    models = await services.models.visible(principal.tenant_id)
    return list_body([m.public() for m in models], False)
