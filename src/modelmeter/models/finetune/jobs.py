"""The fine-tuning job state machine and its queries (no HTTP, no billing).

    validating_files ──▶ queued ──▶ running ──▶ succeeded
           │               │           ├──────▶ failed
           └──▶ failed     └───────────┴──────▶ cancelled     (running ──▶ queued when its worker died)

Every transition is a compare-and-set on ``status``, so a cancel racing a worker, or two workers racing for
one job, can never both win. Workers claim with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictFloat, StringConstraints, model_validator
from sqlalchemy import func, update
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.errors import ConflictError, InvalidRequestError, NotFoundError, RateLimitError
from modelmeter.fields import INTEGRAL, PYTHON_RE
from modelmeter.ids import new_id
from modelmeter.models.finetune.hparams import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LEARNING_RATE_MULTIPLIER,
    DEFAULT_LORA_ALPHA,
    DEFAULT_LORA_RANK,
    DEFAULT_N_EPOCHS,
    MAX_LORA_RANK,
)
from modelmeter.models.finetune.tables import (
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
    FineTuningEvent,
    FineTuningJob,
    TenantFile,
)

Auto = Literal["auto"]


class HyperparametersIn(BaseModel):
    model_config = ConfigDict(extra="forbid", regex_engine=PYTHON_RE)
    n_epochs: Annotated[int, Strict(), Field(ge=1, le=50), INTEGRAL] | Auto = "auto"
    batch_size: Annotated[int, Strict(), Field(ge=1, le=512), INTEGRAL] | Auto = "auto"
    learning_rate_multiplier: Annotated[StrictFloat, Field(gt=0, le=100)] | Auto = "auto"


class TrainingTypeIn(BaseModel):
    """``{"type": "lora", "rank", "alpha"}`` (the default: an adapter on the frozen base) or ``{"type": "full"}``.

    ``alpha`` defaults to twice the rank, which keeps the update's scale (alpha / rank) and so the default
    learning rate right whatever the rank."""

    # The schema states the rule the validator below enforces (a full fine-tune takes no rank or alpha) as a
    # union of the two shapes, so that clients and contract testers see it; validation stays one model so that
    # errors name ``training_type.rank``, not a union branch.
    model_config = ConfigDict(extra="forbid", regex_engine=PYTHON_RE,
                              json_schema_extra=lambda schema: _one_of_two_shapes(schema))
    type: Literal["lora", "full"]
    rank: Annotated[int, Strict(), Field(ge=1, le=MAX_LORA_RANK), INTEGRAL] | None = None
    alpha: Annotated[int, Strict(), Field(ge=1, le=1024), INTEGRAL] | None = None

    @model_validator(mode="after")
    def _full_takes_no_rank(self) -> TrainingTypeIn:
        if self.type == "full" and (self.rank is not None or self.alpha is not None):
            raise ValueError("a full fine-tune takes no 'rank' or 'alpha'")
        return self

    def public(self) -> dict[str, Any]:
        if self.type == "full":
            return {"type": "full"}
        rank = self.rank or DEFAULT_LORA_RANK
        return {"type": "lora", "rank": rank, "alpha": self.alpha or 2 * rank}


def _one_of_two_shapes(schema: dict[str, Any]) -> None:
    properties = schema.pop("properties")
    schema.pop("required", None)
    schema.pop("additionalProperties", None)  # each branch forbids extras itself
    lora = {**properties, "type": {"const": "lora", "type": "string"}}
    full = {"type": {"const": "full", "type": "string"}}
    schema["oneOf"] = [
        {"type": "object", "properties": lora, "required": ["type"], "additionalProperties": False},
        {"type": "object", "properties": full, "required": ["type"], "additionalProperties": False},
    ]


DEFAULT_TRAINING = TrainingTypeIn(type="lora", rank=DEFAULT_LORA_RANK, alpha=DEFAULT_LORA_ALPHA)


class JobCreate(BaseModel):
    """OpenAI's job request, as far as it applies to BERT classifiers, plus ``training_type``."""

    model_config = ConfigDict(extra="forbid", regex_engine=PYTHON_RE)
    model: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    training_file: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    validation_file: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    hyperparameters: HyperparametersIn | None = None
    suffix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,40}$")] | None = None
    seed: Annotated[int, Strict(), Field(ge=0, le=2**31 - 1), INTEGRAL] | None = None
    training_type: TrainingTypeIn | None = None
    # A classifier (rows of text and label) or a tagger (named entities: rows of tagged tokens or entity spans).
    task: Literal["text-classification", "token-classification"] = "text-classification"

    def training(self) -> dict[str, Any]:
        """The training type in its stored (public) form; LoRA with the default rank when absent."""
        return (self.training_type or DEFAULT_TRAINING).public()


# --- queries ----------------------------------------------------------------------------------------


def get_file(*, session: Session, tenant_id: str, file_id: str, param: str = "file_id") -> TenantFile:
    """The tenant's file; another tenant's file is answered as a missing one."""
    f = session.get(TenantFile, file_id)
    if f is None or f.tenant_id != tenant_id:
        raise NotFoundError(f"No such file: '{file_id}'.", code="file_not_found", param=param)
    return f


def get_job(*, session: Session, tenant_id: str, job_id: str) -> FineTuningJob:
    job = session.get(FineTuningJob, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFoundError(f"No such fine-tuning job: '{job_id}'.", code="job_not_found", param="fine_tuning_job_id")
    return job


def find_job(*, session: Session, job_id: str) -> FineTuningJob:
    """Any tenant's job (the operator's view); 404 when there is none."""
    job = session.get(FineTuningJob, job_id)
    if job is None:
        raise NotFoundError(f"No such fine-tuning job: '{job_id}'.", code="job_not_found", param="fine_tuning_job_id")
    return job


def page(*, session: Session, query: Any, limit: int) -> tuple[list[Any], bool]:
    rows = list(session.exec(query.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


def list_files(
    *, session: Session, tenant_id: str, limit: int, after: str | None, purposes: tuple[str, ...] | None = None
) -> tuple[list[TenantFile], bool]:
    """The tenant's files, newest first, of ``purposes`` (None: all)."""
    query = select(TenantFile).where(TenantFile.tenant_id == tenant_id).order_by(col(TenantFile.id).desc())
    if purposes is not None:
        query = query.where(col(TenantFile.purpose).in_(purposes))
    if after:
        query = query.where(col(TenantFile.id) < after)
    return page(session=session, query=query, limit=limit)


def list_jobs(*, session: Session, tenant_id: str, limit: int, after: str | None) -> tuple[list[FineTuningJob], bool]:
    query = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id).order_by(col(FineTuningJob.id).desc())
    if after:
        query = query.where(col(FineTuningJob.id) < after)
    return page(session=session, query=query, limit=limit)


def list_all_jobs(
    *, session: Session, tenant_id: str | None, limit: int, after: str | None
) -> tuple[list[FineTuningJob], bool]:
    """Every tenant's jobs, or one tenant's, newest first (the operator's view)."""
    query = select(FineTuningJob).order_by(col(FineTuningJob.id).desc())
    if tenant_id is not None:
        query = query.where(FineTuningJob.tenant_id == tenant_id)
    if after:
        query = query.where(col(FineTuningJob.id) < after)
    return page(session=session, query=query, limit=limit)


def events_since(*, session: Session, job_id: str, after_seq: int, limit: int) -> list[FineTuningEvent]:
    """The job's events after the one numbered ``after_seq`` (0: from the first), oldest first."""
    query = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id, col(FineTuningEvent.seq) > after_seq)
    return list(session.exec(query.order_by(col(FineTuningEvent.seq)).limit(limit)).all())


def list_events(*, session: Session, job_id: str, limit: int, after: str | None) -> tuple[list[FineTuningEvent], bool]:
    query = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id).order_by(col(FineTuningEvent.seq).desc())
    if after:
        seq = after.removeprefix("ftevent_")
        if not seq.isdigit():
            raise InvalidRequestError("'after' must be an event id.", code="invalid_value", param="after")
        query = query.where(col(FineTuningEvent.seq) < int(seq))
    return page(session=session, query=query, limit=limit)


def add_event(
    *, session: Session, job_id: str, message: str, level: str = "info", type_: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(FineTuningEvent(job_id=job_id, created_at=clock.now_s(), level=level, type=type_, message=message,
                                data_json=json.dumps(data) if data else None))


def file_in_use(*, session: Session, file_id: str) -> bool:
    uses = (col(FineTuningJob.training_file) == file_id) | (col(FineTuningJob.validation_file) == file_id)
    query = select(func.count()).select_from(FineTuningJob).where(uses)
    return bool(session.exec(query.where(col(FineTuningJob.status).in_(ACTIVE_STATUSES))).one())


# --- transitions ------------------------------------------------------------------------------------


def validate_job(*, session: Session, tenant_id: str, data: JobCreate, base_models: Sequence[str]) -> TenantFile:
    """Check the base model and the files (404 for another tenant's file); returns the training file."""
    if data.model not in base_models:
        raise NotFoundError(
            f"No base model '{data.model}' to fine-tune; base models: {', '.join(base_models)}.",
            code="model_not_found", param="model",
        )
    training = get_file(session=session, tenant_id=tenant_id, file_id=data.training_file, param="training_file")
    check_file(training, data.task, "training_file")
    return training


def check_file(f: TenantFile, task: str, param: str) -> None:
    """A file a ``task`` job can train on: uploaded for fine-tuning, holding that task's rows (422 otherwise)."""
    code = "invalid_training_file" if param == "training_file" else "invalid_validation_file"
    if f.purpose != "fine-tune":
        raise InvalidRequestError(f"The file '{f.id}' was uploaded with purpose \"{f.purpose}\"; a job trains on "
                                  "a \"fine-tune\" file.", code=code, param=param)
    if f.task != task:
        rows = "tagged tokens or entity spans" if f.task == "token-classification" else "texts with labels"
        raise InvalidRequestError(
            f"The file '{f.id}' holds {rows} ({f.task}); a {task} job needs a {task} file. Set \"task\" to "
            f"\"{f.task}\" to train on it.", code=code, param=param)


def n_epochs_of(data: JobCreate) -> int:
    hp = data.hyperparameters or HyperparametersIn()
    return DEFAULT_N_EPOCHS if hp.n_epochs == "auto" else hp.n_epochs


def active_estimates(*, session: Session, tenant_id: str) -> int:
    """Training tokens promised to this tenant's jobs that have not finished (they are not in the ledger yet)."""
    query = select(func.sum(FineTuningJob.estimated_tokens)).where(FineTuningJob.tenant_id == tenant_id)
    return int(session.exec(query.where(col(FineTuningJob.status).in_(ACTIVE_STATUSES))).one() or 0)


def create_job(
    *, session: Session, tenant_id: str, data: JobCreate, base_models: Sequence[str], max_active: int,
    estimated_tokens: int | None = None,
) -> FineTuningJob:
    """Validate the request and its files, then queue the job (one transaction; nothing written on refusal)."""
    training = validate_job(session=session, tenant_id=tenant_id, data=data, base_models=base_models)
    validation = None
    if data.validation_file:
        validation = get_file(session=session, tenant_id=tenant_id, file_id=data.validation_file,
                              param="validation_file")
        check_file(validation, data.task, "validation_file")
        unknown = sorted(set(validation.labels) - set(training.labels))
        if unknown:
            raise InvalidRequestError(
                f"The validation file has labels the training file lacks: {', '.join(unknown[:5])}.",
                code="invalid_validation_file", param="validation_file",
            )
    _check_active(session=session, tenant_id=tenant_id, max_active=max_active)
    job = _new_job(tenant_id, data)
    job.estimated_tokens = estimated_tokens
    session.add(job)
    session.flush()
    add_event(session=session, job_id=job.id,
              message=f"Validating training file: {training.id} ({training.rows} rows, {len(training.labels)} "
                      f"{'entity types' if training.task == 'token-classification' else 'labels'})")
    if validation is not None:
        add_event(session=session, job_id=job.id,
                  message=f"Validating validation file: {validation.id} ({validation.rows} rows)")
    job.status = "queued"
    add_event(session=session, job_id=job.id, message="Files validated; job queued.")
    session.flush()
    return job


def _check_active(*, session: Session, tenant_id: str, max_active: int) -> None:
    query = select(func.count()).select_from(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
    active = session.exec(query.where(col(FineTuningJob.status).in_(ACTIVE_STATUSES))).one()
    if active >= max_active:
        raise RateLimitError(
            f"At most {max_active} fine-tuning jobs may be active at once; wait for one to finish.",
            code="too_many_active_jobs",
        )


def _new_job(tenant_id: str, data: JobCreate) -> FineTuningJob:
    hp = data.hyperparameters or HyperparametersIn()
    return FineTuningJob(
        id=new_id("ftjob"), tenant_id=tenant_id, model=data.model, training_file=data.training_file,
        validation_file=data.validation_file, suffix=data.suffix, created_at=clock.now_s(),
        n_epochs=n_epochs_of(data),
        batch_size=DEFAULT_BATCH_SIZE if hp.batch_size == "auto" else hp.batch_size,
        learning_rate_multiplier=(DEFAULT_LEARNING_RATE_MULTIPLIER if hp.learning_rate_multiplier == "auto"
                                  else float(hp.learning_rate_multiplier)),
        seed=data.seed if data.seed is not None else 42,
        training_type_json=json.dumps(data.training()), task=data.task,
    )


def _transition(session: Session, job_id: str, from_: Sequence[str], **values: Any) -> bool:
    """Compare-and-set: move the job only if it is still in one of ``from_``."""
    statement = (
        update(FineTuningJob)
        .where(col(FineTuningJob.id) == job_id)
        .where(col(FineTuningJob.status).in_(from_))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]


def cancel_job(*, session: Session, job: FineTuningJob) -> FineTuningJob:
    """Cancel a job that has not finished; a running job's worker notices within a heartbeat."""
    if job.status in FINISHED_STATUSES or not _transition(
        session, job.id, ACTIVE_STATUSES, status="cancelled", finished_at=clock.now_s()
    ):
        session.refresh(job)
        raise ConflictError(f"Job '{job.id}' has already finished ({job.status}).", code="job_finished")
    add_event(session=session, job_id=job.id, message="Job cancelled.")
    session.flush()
    session.refresh(job)
    return job


def claim_next(*, sessions: sessionmaker[Session], worker_id: str, only: str | None = None) -> str | None:
    """Claim the oldest queued job for ``worker_id`` (``only``: that job, if it is queued); ``None`` when there is
    none."""
    with sessions() as session:
        query = select(FineTuningJob.id).where(FineTuningJob.status == "queued")
        if only is not None:
            query = query.where(FineTuningJob.id == only)
        query = query.order_by(col(FineTuningJob.created_at), col(FineTuningJob.id)).limit(1)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job_id = session.exec(query).first()
        if job_id is None:
            return None
        now = clock.now_s()
        claimed = _transition(session, job_id, ("queued",), status="running", worker_id=worker_id, started_at=now,
                              heartbeat_at=now, attempts=col(FineTuningJob.attempts) + 1)
        if claimed:
            add_event(session=session, job_id=job_id, message=f"Job started by worker {worker_id}.")
        session.commit()
        return job_id if claimed else None


def heartbeat(*, sessions: sessionmaker[Session], job_id: str, worker_id: str) -> bool:
    """Record that the worker is alive; ``False`` when the job is no longer this worker's running job."""
    with sessions() as session:
        statement = (
            update(FineTuningJob)
            .where(col(FineTuningJob.id) == job_id, col(FineTuningJob.status) == "running",
                   col(FineTuningJob.worker_id) == worker_id)
            .values(heartbeat_at=clock.now_s())
        )
        alive = bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]
        session.commit()
        return alive


def finish(*, session: Session, job_id: str, owner: str, status: str, **values: Any) -> bool:
    """Move ``owner``'s running job to a final (or re-queued) state; ``False`` if it was cancelled meanwhile."""
    statement = (
        update(FineTuningJob)
        .where(col(FineTuningJob.id) == job_id, col(FineTuningJob.status) == "running",
               col(FineTuningJob.worker_id) == owner)
        .values(status=status, **values)
    )
    return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]


def fail_values(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error_code": code, "error_message": message, "error_param": param, "finished_at": clock.now_s()}


def recover_orphans(
    *, sessions: sessionmaker[Session], is_dead: Any, max_attempts: int = 2
) -> list[str]:
    """Re-queue (or fail, after ``max_attempts``) running jobs whose worker ``is_dead(job)``."""
    recovered = []
    with sessions() as session:
        for job in session.exec(select(FineTuningJob).where(FineTuningJob.status == "running")).all():
            if not is_dead(job):
                continue
            if job.attempts < max_attempts:
                moved = finish(session=session, job_id=job.id, owner=job.worker_id or "", status="queued",
                               worker_id=None, heartbeat_at=None)
                message = f"Worker {job.worker_id} stopped mid-job; job re-queued (attempt {job.attempts + 1})."
            else:
                moved = finish(session=session, job_id=job.id, owner=job.worker_id or "", status="failed",
                               **fail_values("worker_died", f"The worker died {job.attempts} times running this "
                                                            "job; it was not retried again."))
                message = f"Worker {job.worker_id} stopped mid-job; job failed after {job.attempts} attempts."
            if moved:
                add_event(session=session, job_id=job.id, message=message, level="warn")
                recovered.append(job.id)
        session.commit()
    return recovered
