"""Files, OpenAI-compatible: upload (validated at once, errors name the line), list, retrieve, content, delete.
A ``fine-tune`` file is training data; a ``batch`` file holds one inference request per line (the Batch API's),
and a ``batch_output`` file a batch's answers. A file's purpose decides the scope its routes need: ``fine-tune``
for training data, ``inference`` for batch files (the scope that creates batches), so a key that may only call
the models can still run a batch end to end, and never reads training data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from modelmeter.errors import InvalidRequestError, PayloadTooLargeError
from modelmeter.gateway.auth import Principal
from modelmeter.gateway.deps import CurrentPrincipal, ListDep, ServicesDep, SessionDep
from modelmeter.gateway.schemas import TENANT_READ, TENANT_WRITE, errors
from modelmeter.models.batchfile import BatchFile, parse_batch_file
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.dataset import DatasetError, ParsedDataset, parse_dataset
from modelmeter.models.finetune.tables import FileDeleted, FilePublic, TenantFile
from modelmeter.models.finetune.tagged import TaggedDataset, looks_tagged, parse_tagged
from modelmeter.models.registry import artifact_path
from modelmeter.ops import files
from modelmeter.settings import Settings
from modelmeter.shapes import Page

router = APIRouter(tags=["files"])
BATCH_PURPOSES = ("batch", "batch_output")


def _scope(purpose: str) -> str:
    return "inference" if purpose in BATCH_PURPOSES else "fine-tune"


def _own_file(principal: Principal, session: SessionDep, file_id: str) -> TenantFile:
    """The tenant's file: 404 unless it has it, then 403 unless the key has the scope its purpose needs."""
    row = jobs.get_file(session=session, tenant_id=principal.tenant_id, file_id=file_id)
    principal.require(_scope(row.purpose))
    return row


def _parse(settings: Settings, data: bytes, filename: str, purpose: str) -> ParsedDataset | TaggedDataset | BatchFile:
    """A batch file (``purpose="batch"``: a request per line); else a classification file (text and label), or a
    token-classification one (tagged tokens, or text with entity spans: ``tagged.looks_tagged`` tells them apart
    by the first row)."""
    try:
        if purpose == "batch":
            return parse_batch_file(data, max_inputs=settings.max_inputs_per_request,
                                    max_text_chars=settings.max_text_chars)
        if looks_tagged(data):
            return parse_tagged(data, max_rows=settings.max_file_rows, max_text_chars=settings.max_text_chars)
        return parse_dataset(data, filename=filename, max_rows=settings.max_file_rows,
                             max_text_chars=settings.max_text_chars, max_labels=settings.max_labels)
    except DatasetError as exc:
        kind = "batch" if purpose == "batch" else "training"
        raise InvalidRequestError(f"Invalid {kind} file '{filename}': {exc}", code="invalid_file",
                                  param="file") from exc


@router.post("/v1/files", response_model=FilePublic, responses=errors(*TENANT_WRITE))
async def upload_file(
    principal: CurrentPrincipal,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="fine-tune: JSONL, CSV or TSV of labeled text, or JSONL of tagged "
                                                 "tokens or of text with entity spans (named entities); batch: JSONL "
                                                 "of {custom_id, method, url, body}")],
    purpose: Annotated[Literal["fine-tune", "batch"], Form()],
) -> FilePublic:
    """Upload a labeled dataset (classification, or named entities) or a batch of requests; it is parsed and
    validated before anything is stored, and errors name the line."""
    principal.require(_scope(purpose))
    settings = services.settings
    if file.size is not None and file.size > settings.max_file_bytes:
        raise PayloadTooLargeError(f"Files may be at most {settings.max_file_bytes} bytes.")
    data = await file.read()
    filename = Path(file.filename or "upload.jsonl").name[:255]
    parsed = await run_in_threadpool(_parse, settings, data, filename, purpose)
    counts = None
    if not isinstance(parsed, BatchFile):
        visible = await services.models.visible(principal.tenant_id)
        bases = [artifact_path(m.artifact, settings.data_dir) for m in visible
                 if m.owner_tenant_id is None and m.task == "feature-extraction"]
        # The training tokens are counted here, once per file (a job's creation reads the count).
        counts = await run_in_threadpool(files.platform_token_counts, parsed, bases)
    row = await run_in_threadpool(
        lambda: files.store_file(sessions=services.sessions, data_dir=settings.data_dir,
                                 tenant_id=principal.tenant_id, filename=filename, data=data, parsed=parsed,
                                 token_counts=counts))
    # What a named-entity file's parse read differently, said once, at upload.
    notes = parsed.notes if isinstance(parsed, TaggedDataset) else []
    return FilePublic.of(row, status_details="; ".join(notes) or None)


@router.get("/v1/files", response_model=Page[FilePublic], responses=errors(*TENANT_READ))
def list_files(
    principal: CurrentPrincipal, session: SessionDep, page: ListDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
) -> Page[FilePublic]:
    """The tenant's files of the purposes the key may read (``purpose``: of one)."""
    if purpose is not None:
        principal.require(_scope(purpose))
        purposes: tuple[str, ...] | None = (purpose,)
    elif "fine-tune" in principal.scopes and "inference" in principal.scopes:
        purposes = None
    elif "inference" in principal.scopes:
        purposes = BATCH_PURPOSES
    else:
        principal.require("fine-tune")
        purposes = ("fine-tune",)
    rows, has_more = jobs.list_files(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                     after=page.after, purposes=purposes)
    return Page.of([FilePublic.of(f) for f in rows], has_more)


@router.get("/v1/files/{file_id}", response_model=FilePublic, responses=errors(*TENANT_READ, 404))
def get_file(file_id: str, principal: CurrentPrincipal, session: SessionDep) -> FilePublic:
    return FilePublic.of(_own_file(principal, session, file_id))


@router.get("/v1/files/{file_id}/content", response_class=Response, responses={
    200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes, as uploaded."},
    **errors(*TENANT_READ, 404)})
def file_content(file_id: str, principal: CurrentPrincipal, services: ServicesDep, session: SessionDep) -> Response:
    """The file's bytes, as uploaded (``client.files.content(id)`` in the openai SDK)."""
    _own_file(principal, session, file_id)
    data = files.file_content(sessions=services.sessions, data_dir=services.settings.data_dir,
                              tenant_id=principal.tenant_id, file_id=file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=errors(*TENANT_READ, 404, 409))
def delete_file(file_id: str, principal: CurrentPrincipal, services: ServicesDep, session: SessionDep) -> FileDeleted:
    """Delete a file not used by an active job (409 otherwise)."""
    _own_file(principal, session, file_id)
    files.delete_file(sessions=services.sessions, data_dir=services.settings.data_dir,
                      tenant_id=principal.tenant_id, file_id=file_id)
    return FileDeleted.of(file_id)
