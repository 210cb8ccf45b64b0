"""Fine-tuning jobs, OpenAI-compatible: create, list, retrieve, events, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from modelmeter.billing.periods import period_of
from modelmeter.billing.quota import Amount
from modelmeter.fields import matching
from modelmeter.gateway.deps import FineTunePrincipal, ListDep, ServicesDep, SessionDep
from modelmeter.gateway.schemas import TENANT_READ, TENANT_WRITE, errors
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.tables import FineTuningEventPublic, FineTuningJobPublic
from modelmeter.ops import jobs as ops_jobs
from modelmeter.shapes import Page

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])
EVENT_ID = r"^ftevent_[0-9]{1,18}$"


@router.post("/jobs", response_model=FineTuningJobPublic, responses=errors(*TENANT_WRITE, 404))
async def create_job(data: jobs.JobCreate, principal: FineTunePrincipal, services: ServicesDep
                     ) -> FineTuningJobPublic:
    """Validate the files, check the training quota and budget, and queue a job; the worker picks it up."""
    visible = await services.models.visible(principal.tenant_id)
    bases = {m.id: m for m in visible if m.owner_tenant_id is None and m.task == "feature-extraction"}
    settings = services.settings
    created = await run_in_threadpool(
        lambda: ops_jobs.create_job(sessions=services.sessions, catalog=services.plans, data_dir=settings.data_dir,
                                    max_active=settings.max_active_jobs_per_tenant, tenant_id=principal.tenant_id,
                                    data=data, bases=bases))
    # The job's training tokens count against the quota and budget from now on (the estimate is an upper bound;
    # the worker's ledger row has the exact figure, which the counters start from next period or restart).
    await services.quota.add_committed(principal.tenant_id, period_of(created.job.created_at),
                                       Amount(training_tokens=created.estimated_tokens))
    return FineTuningJobPublic.of(created.job)


@router.get("/jobs", response_model=Page[FineTuningJobPublic], responses=errors(*TENANT_READ))
def list_jobs(principal: FineTunePrincipal, session: SessionDep, page: ListDep) -> Page[FineTuningJobPublic]:
    rows, has_more = jobs.list_jobs(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                    after=page.after)
    return Page.of([FineTuningJobPublic.of(j) for j in rows], has_more)


@router.get("/jobs/{job_id}", response_model=FineTuningJobPublic, responses=errors(*TENANT_READ, 404))
def get_job(job_id: str, principal: FineTunePrincipal, session: SessionDep) -> FineTuningJobPublic:
    return FineTuningJobPublic.of(jobs.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id))


@router.get("/jobs/{job_id}/events", response_model=Page[FineTuningEventPublic], responses=errors(*TENANT_READ, 404))
def get_events(
    job_id: str, principal: FineTunePrincipal, session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(json_schema_extra={"pattern": EVENT_ID}), matching(EVENT_ID)] = None,
) -> Page[FineTuningEventPublic]:
    """The job's events, newest first; ``after`` is an event id (``ftevent_N``)."""
    jobs.get_job(session=session, tenant_id=principal.tenant_id, job_id=job_id)
    rows, has_more = jobs.list_events(session=session, job_id=job_id, limit=limit, after=after)
    return Page.of([FineTuningEventPublic.of(e) for e in rows], has_more)


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJobPublic, responses=errors(*TENANT_WRITE, 404))
def cancel_job(job_id: str, principal: FineTunePrincipal, services: ServicesDep) -> FineTuningJobPublic:
    """Cancel a job that has not finished (409 otherwise); a running job stops within seconds."""
    return FineTuningJobPublic.of(ops_jobs.cancel_job(sessions=services.sessions, tenant_id=principal.tenant_id,
                                               job_id=job_id))
