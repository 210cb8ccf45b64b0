"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from modelmeter.db import ping
from modelmeter.errors import ServiceUnavailableError
from modelmeter.gateway.deps import ServicesDep
from modelmeter.gateway.schemas import Health, Ready, errors

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, responses=errors(503))
async def readyz(services: ServicesDep) -> dict[str, Any]:
    """Ready when the database answers and the engine serving the models does."""
    if not services.engines.ready():
        raise ServiceUnavailableError("The inference engine is not running yet; retry in a second.",
                                      code="engine_unavailable", headers={"Retry-After": "1"})
    try:
        await run_in_threadpool(ping, services.engine)
    except Exception as exc:
        message = f"Database unreachable: {type(exc).__name__}."
        raise ServiceUnavailableError(message, code="database_unavailable") from exc
    return {"status": "ready", "checks": {"database": "ok", "engine": "ok"}}
