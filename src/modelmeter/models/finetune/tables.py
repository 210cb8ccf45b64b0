"""Fine-tuning tables: uploaded files, jobs and their events; and beside each, its public shape (``XPublic.of``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict
from sqlalchemy import BigInteger, Column, Index, Integer, Text
from sqlmodel import Field, SQLModel

from modelmeter.shapes import Public

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
Task = Literal["text-classification", "token-classification"]
BATCH_TASK = "batch"  # the task column of a batch input file (purpose "batch"): it trains nothing
ACTIVE_STATUSES = ("validating_files", "queued", "running")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")


class TenantFile(SQLModel, table=True):
    """An uploaded, validated training or validation file (bytes kept under the data dir)."""

    __tablename__ = "tenant_file"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    filename: str = Field(max_length=255)
    purpose: str = Field(max_length=32)
    bytes: int
    format: str = Field(max_length=8)
    rows: int
    labels_json: str
    path: str = Field(max_length=1024)
    created_at: int
    # Training tokens of one epoch, by tokenizer fingerprint: counted once (at upload for the platform's bases,
    # else at the first job on another base), so creating a job never tokenizes the file again (issue 21).
    token_counts_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # "text-classification" (rows of text and label; labels the classes) or "token-classification" (rows of
    # tagged tokens or of text with entity spans; labels the entity types); BATCH_TASK for a batch input file
    task: str = Field(default="text-classification", max_length=32,
                      sa_column_kwargs={"server_default": "text-classification"})

    @property
    def labels(self) -> list[str]:
        return list(json.loads(self.labels_json))

    @property
    def token_counts(self) -> dict[str, int]:
        return dict(json.loads(self.token_counts_json)) if self.token_counts_json else {}


class FineTuningJob(SQLModel, table=True):
    __tablename__ = "fine_tuning_job"
    __table_args__ = (Index("ix_fine_tuning_job_status_created", "status", "created_at"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    model: str = Field(max_length=128)
    training_file: str = Field(max_length=40)
    validation_file: str | None = Field(default=None, max_length=40)
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int
    suffix: str | None = Field(default=None, max_length=64)
    status: str = Field(default="validating_files", max_length=20)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = None
    error_param: str | None = Field(default=None, max_length=64)
    fine_tuned_model: str | None = Field(default=None, max_length=128)
    trained_tokens: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    estimated_tokens: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    result_json: str | None = None
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    worker_id: str | None = Field(default=None, max_length=128)
    heartbeat_at: int | None = None
    attempts: int = 0
    # {"type": "lora", "rank", "alpha"} or {"type": "full"}; NULL on jobs from before adapters (trained in full).
    training_type_json: str | None = None
    task: str = Field(default="text-classification", max_length=32,
                      sa_column_kwargs={"server_default": "text-classification"})

    @property
    def result(self) -> dict[str, Any] | None:
        return json.loads(self.result_json) if self.result_json else None

    @property
    def training_type(self) -> dict[str, Any]:
        return dict(json.loads(self.training_type_json)) if self.training_type_json else {"type": "full"}


class FineTuningEvent(SQLModel, table=True):
    __tablename__ = "fine_tuning_event"

    # INTEGER on SQLite so the key autoincrements; BIGINT elsewhere.
    seq: int | None = Field(
        default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    )
    job_id: str = Field(foreign_key="fine_tuning_job.id", index=True, max_length=40)
    created_at: int
    level: str = Field(default="info", max_length=8)
    type: str = Field(default="message", max_length=16)
    message: str
    data_json: str | None = None


# --- public shapes ---------------------------------------------------------------------------------------


class FilePublic(Public):
    """An uploaded file (OpenAI's file object, with what validation found)."""

    model_config = ConfigDict(title="FileObject")

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"]
    status_details: str | None  # at upload: what a named-entity file's parse read as IOB2 does (I- begins)
    rows: int
    labels: list[str]  # the classes, a token-classification file's entity types, or a batch file's routes
    task: Task | None  # what a fine-tune file trains; None for a batch file (its rows are requests)

    @classmethod
    def of(cls, f: TenantFile, *, status_details: str | None = None) -> FilePublic:
        return cls(id=f.id, object="file", bytes=f.bytes, created_at=f.created_at, filename=f.filename,
                   purpose=f.purpose, status="processed", status_details=status_details, rows=f.rows,
                   labels=f.labels, task=None if f.task == BATCH_TASK else f.task)


class FileDeleted(Public):
    id: str
    object: Literal["file"]
    deleted: bool

    @classmethod
    def of(cls, file_id: str) -> FileDeleted:
        return cls(id=file_id, object="file", deleted=True)


class Hyperparameters(Public):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class JobError(Public):
    code: str
    message: str | None
    param: str | None


class FineTuningJobPublic(Public):
    """A fine-tuning job (OpenAI's shape, with the result metrics, the training type and the task)."""

    model_config = ConfigDict(title="FineTuningJob")

    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: JobStatus
    validation_file: str | None
    training_file: str
    hyperparameters: Hyperparameters
    trained_tokens: int | None
    error: JobError | None
    seed: int
    user_provided_suffix: str | None
    estimated_finish: int | None
    integrations: list[Any]
    result: dict[str, Any] | None  # accuracy and per-label precision/recall/F1 once succeeded
    training_type: dict[str, Any]  # {"type": "lora", "rank", "alpha"} or {"type": "full"}
    task: Task

    @classmethod
    def of(cls, j: FineTuningJob) -> FineTuningJobPublic:
        error = JobError(code=j.error_code, message=j.error_message, param=j.error_param) if j.error_code else None
        return cls(
            id=j.id, object="fine_tuning.job", created_at=j.created_at, finished_at=j.finished_at, model=j.model,
            fine_tuned_model=j.fine_tuned_model, organization_id=j.tenant_id, result_files=[],
            status=j.status,
            validation_file=j.validation_file, training_file=j.training_file,
            hyperparameters=Hyperparameters(n_epochs=j.n_epochs, batch_size=j.batch_size,
                                            learning_rate_multiplier=j.learning_rate_multiplier),
            trained_tokens=j.trained_tokens, error=error, seed=j.seed, user_provided_suffix=j.suffix,
            estimated_finish=j.estimated_finish, integrations=[], result=j.result, training_type=j.training_type,
            task=j.task,
        )


class FineTuningEventPublic(Public):
    model_config = ConfigDict(title="FineTuningEvent")

    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any]

    @classmethod
    def of(cls, e: FineTuningEvent) -> FineTuningEventPublic:
        return cls(id=f"ftevent_{e.seq}", object="fine_tuning.job.event", created_at=e.created_at, level=e.level,
                   message=e.message, type=e.type, data=json.loads(e.data_json) if e.data_json else {})
