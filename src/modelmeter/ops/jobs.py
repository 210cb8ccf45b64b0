"""Fine-tuning jobs as a tenant creates them: files checked, the training quota and budget held, one transaction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.meter import as_amount, check_training_quota
from modelmeter.billing.periods import period_of
from modelmeter.billing.quota import Amount
from modelmeter.billing.spend import period_usage
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.estimate import epoch_tokens, tokenizer_fingerprint
from modelmeter.models.finetune.tables import FineTuningEventPublic, FineTuningJob, FineTuningJobPublic, TenantFile
from modelmeter.models.registry import MlModel, ModelInfo, artifact_path
from modelmeter.ops import files
from modelmeter.tenancy.tenants import get_tenant, lock_tenant


@dataclass(frozen=True, slots=True)
class CreatedJob:
    job: FineTuningJob
    estimated_tokens: int  # an upper bound of the training tokens, counted against the quota from now on


def create_job(*, sessions: sessionmaker[Session], catalog: PlanCatalog, data_dir: Path, max_active: int,
               tenant_id: str, data: jobs.JobCreate, bases: dict[str, ModelInfo]) -> CreatedJob:
    """Validate the files, estimate the training tokens, and queue the job if it fits the quota and budget
    (blocking, but never tokenizes a file twice: its count is kept with it)."""
    with sessions() as session:
        training = jobs.validate_job(session=session, tenant_id=tenant_id, data=data, base_models=list(bases))
    artifact = bases[data.model].artifact
    estimate = _estimate(sessions, data_dir, training, artifact, jobs.n_epochs_of(data))
    if data.validation_file:  # evaluated once and billed as training: counted (an upper bound: it may be sampled)
        with sessions() as session:
            validation = jobs.get_file(session=session, tenant_id=tenant_id, file_id=data.validation_file,
                                       param="validation_file")
            jobs.check_file(validation, data.task, "validation_file")  # before reading it: not a batch file
        estimate += _estimate(sessions, data_dir, validation, artifact, 1)
    with sessions() as session:
        # One job creation per tenant at a time, so the active-job limit and the training quota hold.
        lock_tenant(session=session, tenant_id=tenant_id)
        tenant = get_tenant(session=session, tenant_id=tenant_id)
        used = as_amount(period_usage(session=session, tenant_id=tenant_id, period=period_of(clock.now_s())))
        pending = jobs.active_estimates(session=session, tenant_id=tenant_id)
        check_training_quota(plan=catalog.get(tenant.plan), budget_cents=tenant.monthly_budget_cents,
                             used=used + Amount(training_tokens=pending), training_tokens=estimate)
        job = jobs.create_job(session=session, tenant_id=tenant_id, data=data, base_models=list(bases),
                              max_active=max_active, estimated_tokens=estimate)
        session.commit()
        return CreatedJob(job, estimate)


def _estimate(sessions: sessionmaker[Session], data_dir: Path, training: TenantFile, artifact: str,
              n_epochs: int) -> int:
    """The file's kept epoch count for this base's tokenizer times the epochs; counted (once) if not kept."""
    base_dir = artifact_path(artifact, data_dir)
    fingerprint = tokenizer_fingerprint(base_dir)
    per_epoch = training.token_counts.get(fingerprint)
    if per_epoch is None:
        per_epoch = count_file_tokens(data_dir, training, base_dir)
        with sessions() as session:
            row = session.get(TenantFile, training.id)
            if row is not None:
                row.token_counts_json = json.dumps({**row.token_counts, fingerprint: per_epoch})
                session.add(row)
                session.commit()
    return per_epoch * n_epochs


def count_file_tokens(data_dir: Path, training: TenantFile, base_dir: Path) -> int:
    """Tokenize a stored file's texts (it was validated, and so bounded, at upload)."""
    return epoch_tokens(base_dir, files.training_texts(files.read_training_file(data_dir, training)))


def cancel_job(*, sessions: sessionmaker[Session], tenant_id: str, job_id: str) -> FineTuningJob:
    """Cancel a job that has not finished (409 otherwise); a running job's worker stops within seconds."""
    with sessions() as session:
        job = jobs.cancel_job(session=session, job=jobs.get_job(session=session, tenant_id=tenant_id, job_id=job_id))
        session.commit()
        return job


# --- the operator's view: any tenant's jobs (``modelmeter jobs``, ``modelmeter quickstart``) -------------------


def get_job(*, sessions: sessionmaker[Session], job_id: str) -> FineTuningJobPublic:
    """Any tenant's job, in its public form (404 when there is none)."""
    with sessions() as session:
        return FineTuningJobPublic.of(jobs.find_job(session=session, job_id=job_id))


def list_jobs(*, sessions: sessionmaker[Session], tenant_id: str | None, limit: int,
              after: str | None) -> tuple[list[FineTuningJobPublic], bool]:
    """Every tenant's jobs (or one tenant's: 404 for a missing tenant), newest first, in their public form."""
    with sessions() as session:
        if tenant_id is not None:
            get_tenant(session=session, tenant_id=tenant_id)
        rows, has_more = jobs.list_all_jobs(session=session, tenant_id=tenant_id, limit=limit, after=after)
        return [FineTuningJobPublic.of(j) for j in rows], has_more


def job_events(*, sessions: sessionmaker[Session], job_id: str, after_seq: int = 0,
               limit: int = 1000) -> tuple[FineTuningJobPublic, list[FineTuningEventPublic]]:
    """A job (404 when there is none) and its events after ``after_seq``, oldest first, in their public form.

    The job is read before the events, so once it has finished the events include its last one."""
    with sessions() as session:
        job = FineTuningJobPublic.of(jobs.find_job(session=session, job_id=job_id))
        events = jobs.events_since(session=session, job_id=job_id, after_seq=after_seq, limit=limit)
        return job, [FineTuningEventPublic.of(e) for e in events]


def base_models(*, sessions: sessionmaker[Session]) -> dict[str, ModelInfo]:
    """The platform's models a tenant may fine-tune (feature-extraction bases), by id."""
    with sessions() as session:
        query = select(MlModel).where(col(MlModel.owner_tenant_id).is_(None), MlModel.task == "feature-extraction")
        return {row.id: ModelInfo.of(row) for row in session.exec(query).all()}
