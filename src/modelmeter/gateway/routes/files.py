"""Training files, OpenAI-compatible: upload (validated at once, errors name the line), list, retrieve, delete."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from modelmeter import clock
from modelmeter.errors import ConflictError, InvalidRequestError, PayloadTooLargeError
from modelmeter.gateway.deps import FineTunePrincipal, ListDep, ServicesDep, SessionDep, list_body
from modelmeter.ids import new_id
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.dataset import DatasetError, ParsedDataset, parse_dataset
from modelmeter.models.finetune.tables import TenantFile
from modelmeter.settings import Settings

router = APIRouter(tags=["files"])


def _parse(settings: Settings, data: bytes, filename: str) -> ParsedDataset:
    try:
        return parse_dataset(data, filename=filename, max_rows=settings.max_file_rows,
                             max_text_chars=settings.max_text_chars, max_labels=settings.max_labels)
    except DatasetError as exc:
        raise InvalidRequestError(f"Invalid training file '{filename}': {exc}", code="invalid_file",
                                  param="file") from exc


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


@router.post("/v1/files")
async def upload_file(
    principal: FineTunePrincipal,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="JSONL, CSV or TSV of labeled text")],
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    """Upload a labeled dataset; it is parsed and validated before anything is stored."""
    settings = services.settings
    if purpose != "fine-tune":
        raise InvalidRequestError("Only purpose 'fine-tune' is supported.", code="invalid_value", param="purpose")
    if file.size is not None and file.size > settings.max_file_bytes:
        raise PayloadTooLargeError(f"Files may be at most {settings.max_file_bytes} bytes.")
    data = await file.read()
    filename = Path(file.filename or "upload.jsonl").name[:255]
    parsed = await run_in_threadpool(_parse, settings, data, filename)
    return await run_in_threadpool(_store, services.sessions, settings, principal.tenant_id, filename, data, parsed)


def _store(sessions: Any, settings: Settings, tenant_id: str, filename: str, data: bytes,
           parsed: ParsedDataset) -> dict[str, Any]:
    file_id = new_id("file")
    relative = Path("files") / tenant_id / file_id
    _write_atomically(settings.data_dir / relative, data)
    row = TenantFile(
        id=file_id, tenant_id=tenant_id, filename=filename, purpose="fine-tune", bytes=len(data),
        format=Path(filename).suffix.lstrip(".").lower()[:8] or "jsonl", rows=len(parsed.examples),
        labels_json=json.dumps(parsed.labels), path=str(relative), created_at=clock.now_s(),
    )
    try:
        with sessions() as session:
            session.add(row)
            session.commit()
    except BaseException:
        (settings.data_dir / relative).unlink(missing_ok=True)  # nothing half-written is left behind
        raise
    return jobs.file_public(row)


@router.get("/v1/files")
def list_files(
    principal: FineTunePrincipal, session: SessionDep, page: ListDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
) -> dict[str, Any]:
    rows, has_more = jobs.list_files(session=session, tenant_id=principal.tenant_id, limit=page.limit,
                                     after=page.after, purpose=purpose)
    return list_body([jobs.file_public(f) for f in rows], has_more)


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, principal: FineTunePrincipal, session: SessionDep) -> dict[str, Any]:
    return jobs.file_public(jobs.get_file(session=session, tenant_id=principal.tenant_id, file_id=file_id))


@router.delete("/v1/files/{file_id}")
def delete_file(
    file_id: str, principal: FineTunePrincipal, session: SessionDep, services: ServicesDep
) -> dict[str, Any]:
    """Delete a file not used by an active job (409 otherwise)."""
    row = jobs.get_file(session=session, tenant_id=principal.tenant_id, file_id=file_id)
    if jobs.file_in_use(session=session, file_id=file_id):
        raise ConflictError("The file is used by an active fine-tuning job.", code="file_in_use", param="file_id")
    session.delete(row)
    session.commit()
    with contextlib.suppress(FileNotFoundError):
        (services.settings.data_dir / row.path).unlink()
    return {"id": file_id, "object": "file", "deleted": True}
