"""Liveness and readiness."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from modelmeter.db import ping
from modelmeter.errors import ServiceUnavailableError
from modelmeter.gateway.deps import ServicesDep
from modelmeter.gateway.schemas import errors
from modelmeter.shapes import Public

router = APIRouter(tags=["health"])


class Health(Public):
    status: Literal["ok"]


class Ready(Public):
    status: Literal["ready"]
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and serving HTTP."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses=errors(503))
async def readyz(services: ServicesDep) -> Ready:
    """Ready when the database answers and the engine serving the models does."""
    if not services.engines.ready():
        raise ServiceUnavailableError("The inference engine is not running yet; retry in a second.",
                                      code="engine_unavailable", headers={"Retry-After": "1"})
    try:
        await run_in_threadpool(ping, services.engine)
    except Exception as exc:
        message = f"Database unreachable: {type(exc).__name__}."
        raise ServiceUnavailableError(message, code="database_unavailable") from exc
    return Ready(status="ready", checks={"database": "ok", "engine": "ok"})
