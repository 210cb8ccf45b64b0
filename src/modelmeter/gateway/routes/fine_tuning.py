"""Fine-tuning jobs, OpenAI-compatible: create, list, retrieve, events, cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlmodel import select

from modelmeter.gateway.deps import FineTunePrincipal, ListDep, ServicesDep, SessionDep, list_body
from modelmeter.gateway.tenants import Tenant
from modelmeter.models.finetune import jobs

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post("/jobs")
async def create_job(data: jobs.JobCreate, principal: FineTunePrincipal, services: ServicesDep) -> dict[str, Any]:
    """Validate the files and queue a job; the worker picks it up."""
    visible = await services.models.visible(principal.tenant_id)
    bases = [m.id for m in visible if m.owner_tenant_id is None and m.task == "feature-extraction"]
    with services.sessions() as session:
        # Serialise job creation per tenant so the active-job limit holds under concurrency.
        session.exec(select(Tenant).where(Tenant.id == principal.tenant_id).with_for_update()).one()
        job = jobs.create_job(session=session, tenant_id=principal.tenant_id, data=data, base_models=bases,
                              max_active=services.settings.max_active_jobs_per_tenant)
        session.commit()
        return jobs.job_public(job)


@router.get("/jobs")
def list_jobs(principal: FineTunePrincipal, session: SessionDep, page: ListDep) -> dict[str, Any]:
    rows, has_more = jobs.list_jobs(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                    after=page.after)
    return list_body([jobs.job_public(j) for j in rows], has_more)


@router.get("/jobs/{job_id}")
def get_job(job_id: str, principal: FineTunePrincipal, session: SessionDep) -> dict[str, Any]:
    return jobs.job_public(jobs.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id))


@router.get("/jobs/{job_id}/events")
def get_events(job_id: str, principal: FineTunePrincipal, session: SessionDep, page: ListDep) -> dict[str, Any]:
    jobs.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    rows, has_more = jobs.list_events(session=session, job_id=job_id, limit=page.limit, after=page.after)
    return list_body([jobs.event_public(e) for e in rows], has_more)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, principal: FineTunePrincipal, session: SessionDep) -> dict[str, Any]:
    """Cancel a job that has not finished (409 otherwise); a running job stops within seconds."""
    job = jobs.cancel_job(session=session, job=jobs.get_job(session=session, tenant_id=principal.tenant_id,
                                                             job_id=job_id))
    session.commit()
    return jobs.job_public(job)
