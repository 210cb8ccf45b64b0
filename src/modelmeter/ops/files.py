"""Training files as a tenant stores and deletes them: the bytes on the data volume and the row, together."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from modelmeter import clock
from modelmeter.errors import ConflictError
from modelmeter.ids import new_id
from modelmeter.models import batches
from modelmeter.models.batchfile import BatchFile
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.dataset import ParsedDataset, parse_dataset
from modelmeter.models.finetune.estimate import epoch_tokens, tokenizer_fingerprint
from modelmeter.models.finetune.tables import BATCH_TASK, TenantFile
from modelmeter.models.finetune.tagged import TaggedDataset, parse_tagged


def store_file(*, sessions: sessionmaker[Session], data_dir: Path, tenant_id: str, filename: str, data: bytes,
               parsed: ParsedDataset | TaggedDataset | BatchFile, token_counts: dict[str, int] | None = None
               ) -> TenantFile:
    """Write the file, then its row; if the row cannot be committed, the file is removed again. A
    token-classification file's labels are its entity types; a batch file's (``purpose="batch"``) are the routes
    its lines call, and its rows are its requests."""
    file_id = new_id("file")
    relative = Path("files") / tenant_id / file_id
    _write_atomically(data_dir / relative, data)
    if isinstance(parsed, BatchFile):
        purpose, task, rows, labels = "batch", BATCH_TASK, len(parsed.lines), sorted(parsed.urls)
    elif isinstance(parsed, TaggedDataset):
        purpose, task, rows, labels = "fine-tune", "token-classification", len(parsed.examples), parsed.types
    else:
        purpose, task, rows, labels = "fine-tune", "text-classification", len(parsed.examples), parsed.labels
    row = TenantFile(
        id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose, bytes=len(data),
        format=Path(filename).suffix.lstrip(".").lower()[:8] or "jsonl", rows=rows,
        labels_json=json.dumps(labels), path=str(relative),
        created_at=clock.now_s(), token_counts_json=json.dumps(token_counts) if token_counts else None, task=task,
    )
    try:
        with sessions() as session:
            session.add(row)
            session.commit()
    except BaseException:
        (data_dir / relative).unlink(missing_ok=True)  # nothing half-written is left behind
        raise
    return row


def delete_file(*, sessions: sessionmaker[Session], data_dir: Path, tenant_id: str, file_id: str) -> None:
    """Delete a file that no active job uses (409 otherwise): the row, then the bytes."""
    with sessions() as session:
        row = jobs.get_file(session=session, tenant_id=tenant_id, file_id=file_id)
        if jobs.file_in_use(session=session, file_id=file_id):
            raise ConflictError("The file is used by an active fine-tuning job.", code="file_in_use",
                                param="file_id")
        if batches.file_in_use(session=session, file_id=file_id):
            raise ConflictError("The file is the input of a batch still running.", code="file_in_use",
                                param="file_id")
        session.delete(row)
        session.commit()
    with contextlib.suppress(FileNotFoundError):
        (data_dir / row.path).unlink()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def training_texts(parsed: ParsedDataset | TaggedDataset) -> list[str]:
    """What a file's rows tokenize as: the texts, or each row's words joined by spaces (a BERT pre-tokenizer
    splits on spaces, so the words encoded as words give the same tokens)."""
    if isinstance(parsed, TaggedDataset):
        return [" ".join(example.words) for example in parsed.examples]
    return [example.text for example in parsed.examples]


def read_training_file(data_dir: Path, row: TenantFile) -> ParsedDataset | TaggedDataset:
    """A stored file, parsed again (it was validated, and so bounded, at upload)."""
    data = (data_dir / row.path).read_bytes()
    if row.task == "token-classification":
        return parse_tagged(data, max_rows=10**9, max_text_chars=10**9)
    return parse_dataset(data, filename=row.filename, max_rows=10**9, max_text_chars=10**9, max_labels=10**6)


def platform_token_counts(parsed: ParsedDataset | TaggedDataset, base_dirs: list[Path]) -> dict[str, int]:
    """One epoch's training tokens under each platform base's tokenizer (most bases share one: counted once)."""
    counts: dict[str, int] = {}
    texts = training_texts(parsed)
    for base_dir in base_dirs:
        fingerprint = tokenizer_fingerprint(base_dir)
        if fingerprint not in counts:
            counts[fingerprint] = epoch_tokens(base_dir, texts)
    return counts


def file_content(*, sessions: sessionmaker[Session], data_dir: Path, tenant_id: str, file_id: str) -> bytes:
    """The bytes of the tenant's file as uploaded (404 for another tenant's)."""
    with sessions() as session:
        row = jobs.get_file(session=session, tenant_id=tenant_id, file_id=file_id)
    return (data_dir / row.path).read_bytes()
