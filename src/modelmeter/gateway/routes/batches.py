"""The Batch API, OpenAI-compatible: create a batch of a ``purpose="batch"`` file, list, retrieve, cancel. The
lines are served in the background (``gateway/batch_runner.py``), metered like the interactive routes."""

from __future__ import annotations

from fastapi import APIRouter

from modelmeter.gateway.deps import InferencePrincipal, ListDep, ServicesDep, SessionDep
from modelmeter.gateway.schemas import TENANT_READ, TENANT_WRITE, errors
from modelmeter.models import batches
from modelmeter.models.batches import BatchCreate, BatchPublic
from modelmeter.shapes import Page

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.post("", response_model=BatchPublic, responses=errors(*TENANT_WRITE, 404))
def create_batch(data: BatchCreate, principal: InferencePrincipal, services: ServicesDep) -> BatchPublic:
    """Queue the lines of a batch file (``purpose="batch"``, every line for ``endpoint``); they are served within
    the completion window, in the engine's idle time."""
    with services.sessions() as session:
        batch = batches.create_batch(session=session, tenant_id=principal.tenant_id, key_id=principal.key_id,
                                     data=data)
        session.commit()
        return BatchPublic.of(batch)


@router.get("", response_model=Page[BatchPublic], responses=errors(*TENANT_READ))
def list_batches(principal: InferencePrincipal, session: SessionDep, page: ListDep) -> Page[BatchPublic]:
    rows, has_more = batches.list_batches(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                          after=page.after)
    return batches.page_of(rows, has_more)


@router.get("/{batch_id}", response_model=BatchPublic, responses=errors(*TENANT_READ, 404))
def get_batch(batch_id: str, principal: InferencePrincipal, session: SessionDep) -> BatchPublic:
    return BatchPublic.of(batches.get_batch(session=session, tenant_id=principal.tenant_id, batch_id=batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchPublic, responses=errors(*TENANT_WRITE, 404))
def cancel_batch(batch_id: str, principal: InferencePrincipal, services: ServicesDep) -> BatchPublic:
    """Stop serving new lines (409 once the batch has finished); the output so far is kept."""
    with services.sessions() as session:
        batch = batches.cancel_batch(session=session, batch=batches.get_batch(
            session=session, tenant_id=principal.tenant_id, batch_id=batch_id))
        session.commit()
        return BatchPublic.of(batch)
