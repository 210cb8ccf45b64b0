"""Batches (the Batch API, OpenAI-compatible): a tenant's batch file served line by line in the background.

A batch is a job like fine-tuning: created from a validated ``purpose="batch"`` file, claimed by a runner with a
lease (``claim``), served in chunks, and finalized with an output file and an error file. The lease is renewed
after every chunk; a runner that dies leaves the lease to lapse, and the next runner resumes from what the
output files already hold (``gateway/batch_runner.py``). Each line's request id derives from the batch id and
its ``custom_id`` (``line_request_id``), so the ledger's unique request id makes a line billable once, ever.

States: ``in_progress`` (created: its file was validated at upload, so there is no ``validating`` wait),
``finalizing``, ``completed``; ``cancelling`` then ``cancelled`` (the output so far is kept); ``expired`` (the
completion window passed: what was served is kept and billed); ``failed`` (a line was refused for quota: the
batch stops serving, the error file names the line).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import BigInteger, Column, ColumnElement, Index, or_
from sqlmodel import Field as SQLField
from sqlmodel import Session, SQLModel, col, select, update

from modelmeter import clock
from modelmeter.errors import ConflictError, InvalidRequestError, NotFoundError
from modelmeter.ids import new_id
from modelmeter.models.finetune.jobs import page
from modelmeter.models.finetune.tables import TenantFile
from modelmeter.shapes import Page, Public

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
RUNNING = ("in_progress", "cancelling")  # what a runner claims and serves (or winds down)
FINISHED = ("failed", "completed", "expired", "cancelled")
WINDOW_S = {"24h": 24 * 3600}
Endpoint = Literal["/v1/classify", "/v1/embeddings", "/v1/entities"]


class Batch(SQLModel, table=True):
    __tablename__ = "batch"
    __table_args__ = (Index("ix_batch_status_created", "status", "created_at"),)

    id: str = SQLField(primary_key=True, max_length=40)
    tenant_id: str = SQLField(foreign_key="tenant.id", index=True, max_length=40)
    key_id: str | None = SQLField(default=None, max_length=40)  # the key that created it: its lines' usage rows
    input_file_id: str = SQLField(max_length=40)
    endpoint: str = SQLField(max_length=32)
    completion_window: str = SQLField(max_length=8)
    status: str = SQLField(default="in_progress", max_length=16)
    output_file_id: str | None = SQLField(default=None, max_length=40)
    error_file_id: str | None = SQLField(default=None, max_length=40)
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    metadata_json: str | None = None
    errors_json: str | None = None  # [{"code", "message", "line"}] when the batch failed
    lease_owner: str | None = SQLField(default=None, max_length=128)
    lease_until: int | None = SQLField(default=None, sa_column=Column(BigInteger, nullable=True))


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class BatchCreate(BaseModel):
    """``POST /v1/batches``: OpenAI's fields (``completion_window`` is ``24h``, as OpenAI's is)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None


class RequestCounts(Public):
    total: int
    completed: int
    failed: int


class BatchError(Public):
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(Public):
    object: Literal["list"]
    data: list[BatchError]


class BatchPublic(Public):
    """A batch, as ``client.batches.create/retrieve/list/cancel`` read it."""

    model_config = ConfigDict(title="Batch")

    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None

    @classmethod
    def of(cls, b: Batch) -> BatchPublic:
        errors = None
        if b.errors_json:
            errors = BatchErrors(object="list", data=[BatchError(param=None, **e) for e in json.loads(b.errors_json)])
        return cls(
            id=b.id, object="batch", endpoint=b.endpoint, errors=errors, input_file_id=b.input_file_id,
            completion_window=b.completion_window, status=b.status,
            output_file_id=b.output_file_id, error_file_id=b.error_file_id, created_at=b.created_at,
            in_progress_at=b.in_progress_at, expires_at=b.expires_at, finalizing_at=b.finalizing_at,
            completed_at=b.completed_at, failed_at=b.failed_at, expired_at=b.expired_at,
            cancelling_at=b.cancelling_at, cancelled_at=b.cancelled_at,
            request_counts=RequestCounts(total=b.total, completed=b.completed, failed=b.failed),
            metadata=json.loads(b.metadata_json) if b.metadata_json else None)


def line_request_id(batch_id: str, custom_id: str) -> str:
    """The request id of a batch's line: the same for every attempt at it, so it is billed at most once."""
    return "breq_" + hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).hexdigest()[:40]


# --- queries and transitions ---------------------------------------------------------------------------------


def create_batch(*, session: Session, tenant_id: str, key_id: str | None, data: BatchCreate) -> Batch:
    """A batch of the tenant's batch file (404 for another tenant's file; 422 for a fine-tune file, or one with
    lines for another endpoint: a batch file's labels are the routes its lines call). Flushed, not committed."""
    f = session.get(TenantFile, data.input_file_id)
    if f is None or f.tenant_id != tenant_id:
        raise NotFoundError(f"No such file: '{data.input_file_id}'.", code="file_not_found", param="input_file_id")
    if f.purpose != "batch":
        raise InvalidRequestError(f"The file '{f.id}' was uploaded with purpose \"{f.purpose}\"; a batch needs a "
                                  "\"batch\" file.", code="invalid_input_file", param="input_file_id")
    other = sorted(set(f.labels) - {data.endpoint})
    if other:
        raise InvalidRequestError(f"The file '{f.id}' has lines for {', '.join(other)}; this batch's endpoint is "
                                  f"{data.endpoint}.", code="invalid_input_file", param="endpoint")
    now = clock.now_s()
    batch = Batch(id=new_id("batch"), tenant_id=tenant_id, key_id=key_id, input_file_id=f.id,
                  endpoint=data.endpoint, completion_window=data.completion_window, status="in_progress",
                  created_at=now, in_progress_at=now, expires_at=now + WINDOW_S[data.completion_window],
                  total=f.rows, metadata_json=json.dumps(data.metadata) if data.metadata is not None else None)
    session.add(batch)
    session.flush()
    return batch


def get_batch(*, session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != tenant_id:
        raise NotFoundError(f"No such batch: '{batch_id}'.", code="batch_not_found", param="batch_id")
    return batch


def list_batches(*, session: Session, tenant_id: str, limit: int, after: str | None) -> tuple[list[Batch], bool]:
    query = select(Batch).where(Batch.tenant_id == tenant_id).order_by(col(Batch.id).desc())
    if after:
        query = query.where(col(Batch.id) < after)
    return page(session=session, query=query, limit=limit)


def cancel_batch(*, session: Session, batch: Batch) -> Batch:
    """Stop serving new lines; the runner keeps the output so far and finishes the batch as ``cancelled``."""
    if batch.status in FINISHED or batch.status == "finalizing":
        raise ConflictError(f"Batch {batch.id} is {batch.status}; it cannot be cancelled.",
                            code="batch_not_cancellable", param="batch_id")
    if batch.status != "cancelling":
        batch.status, batch.cancelling_at = "cancelling", clock.now_s()
        session.add(batch)
    return batch


def _free(now: int) -> ColumnElement[bool]:
    return or_(col(Batch.lease_owner).is_(None), col(Batch.lease_until).is_(None), col(Batch.lease_until) <= now)


def claim(*, session: Session, owner: str, lease_s: int, now: int) -> Batch | None:
    """Lease the running batch served least recently (never served first; a runner hands a batch back after a
    share of its lines, ``release``, so one tenant's 50,000 lines do not hold a runner while another's wait),
    compare-and-set: one runner per batch. Committed."""
    candidates = session.exec(
        select(Batch.id).where(col(Batch.status).in_(RUNNING), _free(now))
        .order_by(col(Batch.lease_until).asc().nulls_first(), col(Batch.created_at), col(Batch.id)).limit(8)).all()
    for batch_id in candidates:
        taken = session.exec(
            update(Batch).where(col(Batch.id) == batch_id, col(Batch.status).in_(RUNNING), _free(now))
            .values(lease_owner=owner, lease_until=now + lease_s)).rowcount == 1
        session.commit()
        if taken:
            return session.get(Batch, batch_id)
    return None


def file_in_use(*, session: Session, file_id: str) -> bool:
    """Whether a batch not yet finished reads ``file_id``."""
    query = select(Batch.id).where(Batch.input_file_id == file_id, col(Batch.status).in_(RUNNING))
    return session.exec(query.limit(1)).first() is not None


def release(*, session: Session, batch_id: str, owner: str, now: int) -> None:
    """Hand the batch back (its lines are not all served): the next claim takes the batch served least recently."""
    session.exec(update(Batch).where(col(Batch.id) == batch_id, col(Batch.lease_owner) == owner)
                 .values(lease_owner=None, lease_until=now))
    session.commit()


def page_of(rows: list[Batch], has_more: bool) -> Page[BatchPublic]:
    return Page.of([BatchPublic.of(b) for b in rows], has_more)
