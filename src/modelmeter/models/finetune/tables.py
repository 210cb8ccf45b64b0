"""Fine-tuning tables: uploaded files, jobs and their events."""

from __future__ import annotations

import json
from typing import Any, Literal

from sqlalchemy import BigInteger, Column, Index, Integer, Text
from sqlmodel import Field, SQLModel

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
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
    # tagged tokens or of text with entity spans; labels the entity types)
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
