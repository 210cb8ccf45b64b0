"""Fine-tuning jobs, OpenAI-compatible: create, list, retrieve, events, cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import update
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool

from modelmeter import clock
from modelmeter.billing.limits import Amount
from modelmeter.billing.metering import as_amount, check_training_quota, period_of, period_usage
from modelmeter.gateway.deps import FineTunePrincipal, ListDep, ServicesDep, SessionDep, list_body
from modelmeter.gateway.services import Services
from modelmeter.gateway.tenants import Tenant
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.dataset import parse_dataset
from modelmeter.models.finetune.train import estimate_training_tokens
from modelmeter.models.registry import artifact_path

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post("/jobs")
async def create_job(data: jobs.JobCreate, principal: FineTunePrincipal, services: ServicesDep) -> dict[str, Any]:
    """Validate the files, check the training quota and budget, and queue a job; the worker picks it up."""
    visible = await services.models.visible(principal.tenant_id)
    bases = {m.id: m for m in visible if m.owner_tenant_id is None and m.task == "feature-extraction"}
    job = await run_in_threadpool(_create_job, services, principal.tenant_id, data, bases)
    # The job's training tokens count against the quota and budget from now on (the estimate is an upper bound;
    # the worker's ledger row has the exact figure, which the counters start from next period or restart).
    await services.quota.add_committed(principal.tenant_id, period_of(job["created_at"]),
                                       Amount(training_tokens=job["_estimate"]))
    job.pop("_estimate")
    return job


def _create_job(services: Services, tenant_id: str, data: jobs.JobCreate, bases: dict[str, Any]) -> dict[str, Any]:
    with services.sessions() as session:
        training = jobs.validate_job(session=session, tenant_id=tenant_id, data=data, base_models=list(bases))
    estimate = _estimate(services, training, bases[data.model].artifact, jobs.n_epochs_of(data))
    with services.sessions() as session:
        # Serialise job creation per tenant so the active-job limit and the training quota hold under concurrency:
        # a write first takes the row lock on PostgreSQL and the database's write lock on SQLite.
        session.execute(update(Tenant).where(col(Tenant.id) == tenant_id).values(updated=col(Tenant.updated)))
        tenant = session.exec(select(Tenant).where(Tenant.id == tenant_id)).one()
        used = as_amount(period_usage(session, tenant_id, period_of(clock.now_s())))
        pending = jobs.active_estimates(session=session, tenant_id=tenant_id)
        check_training_quota(plan=services.plans.get(tenant.plan), budget_cents=tenant.monthly_budget_cents,
                             used=used + Amount(training_tokens=pending), training_tokens=estimate)
        job = jobs.create_job(session=session, tenant_id=tenant_id, data=data, base_models=list(bases),
                              max_active=services.settings.max_active_jobs_per_tenant, estimated_tokens=estimate)
        session.commit()
        return {**jobs.job_public(job), "_estimate": estimate}


def _estimate(services: Services, training: Any, artifact: str, n_epochs: int) -> int:
    data_dir = services.settings.data_dir
    parsed = parse_dataset((data_dir / training.path).read_bytes(), filename=training.filename, max_rows=10**9,
                           max_text_chars=10**9, max_labels=10**6)
    texts = [example.text for example in parsed.examples]
    return estimate_training_tokens(artifact_path(artifact, data_dir), texts, n_epochs)


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
