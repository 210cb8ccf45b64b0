"""The Batch API's runner: claims a batch with a lease and serves its lines through the app itself.

Each line is a request to its route made in-process (an ASGI call, no socket), carrying the batch's principal
and the line's request id in the scope (``middleware.INTERNAL_*``): the answer is byte for byte what the
interactive route gives, metered by the same path (quota, budget, credits, the ledger's group commit), without
the interactive RPM/TPM limits. A 2xx answer goes to the output file, any other to the error file, each line
appended and flushed once its chunk is served.

Crash safety: the lease is renewed while a chunk is served and after it; a runner that dies lets it lapse and
the next one resumes from the lines its files already hold (a torn last line is cut). Which lines those are is
read from an index (``done.idx``: per chunk, one JSON line of the two files' sizes and line counts after it and
its custom_ids), plus the files' tails past the last sizes the files bear out, so a claim never reads the whole
output (an embeddings batch's reaches hundreds of MB, and a batch is claimed again every ``share`` lines). A
line served and billed whose answer was not yet written is served again; its request id is the same
(``batches.line_request_id``), so the ledger keeps one usage row for it and the invoice bills it once.
Stopping: a cancelled batch (``cancelling``) and one past its window finish after the chunk in flight, keeping
what was served; a line refused for quota stops the batch (``failed``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import col, update
from starlette.types import ASGIApp, Receive, Scope, Send

from modelmeter import clock
from modelmeter.billing import batch_events
from modelmeter.gateway.auth import Principal
from modelmeter.gateway.middleware import INTERNAL_PRINCIPAL, INTERNAL_REQUEST_ID
from modelmeter.gateway.services import Services
from modelmeter.ids import new_id
from modelmeter.models import batches
from modelmeter.models.batches import Batch
from modelmeter.models.batchfile import BatchLine, parse_batch_file
from modelmeter.models.finetune.tables import BATCH_TASK, TenantFile
from modelmeter.periodic import Periodic
from modelmeter.tenancy.tenants import Tenant

log = logging.getLogger("modelmeter.batches")
_LINE_HEADER = "x-modelmeter-batch-line"  # read only by the runner's own wrapper, which is not on the network path
OUTPUT_PURPOSE = "batch_output"
INDEX = "done.idx"  # beside a batch's output and error files: which lines they hold (see the module docstring)


class BatchRunner:
    """One per front: a loop that claims a running batch (``batches.claim``) and serves it, chunk by chunk."""

    def __init__(self, app: ASGIApp, services: Services, *, chunk: int = 64, concurrency: int = 16,
                 lease_s: int = 60, share: int = 1024) -> None:
        self._app = app
        self._services = services
        self._chunk = chunk
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._share = share  # lines served per claim before the batch is handed back (fairness between batches)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lines: dict[str, tuple[Principal, str]] = {}
        self._counts: dict[str, list[int]] = {}  # batch id -> [completed, failed] lines written
        # The last batch's parsed input, kept across its claims (parsing 50,000 lines again every ``share`` lines
        # would cost more than the lines' own routing); one batch at a time, so it is bounded by the file limit.
        self._input: tuple[str, list[BatchLine]] | None = None
        self._loop = Periodic(self.run_once, name="batch runner", immediately=True)

    def start(self, interval_s: float) -> None:  # float-ok: seconds
        self._loop.start(interval_s)

    async def aclose(self) -> None:
        await self._loop.stop()

    async def run_once(self) -> bool:
        """Claim one batch and serve it to the end (or until stopped); whether there was one."""
        batch = await asyncio.to_thread(self._claim)
        if batch is None:
            return False
        try:
            await self._run(batch)
        except Exception:
            log.exception("batch %s: the runner failed; the lease lapses and another pass resumes it", batch.id)
        finally:
            self._counts.pop(batch.id, None)
        return True

    # --- one batch -----------------------------------------------------------------------------------------

    async def _run(self, batch: Batch) -> None:
        settings = self._services.settings
        directory = settings.data_dir / "batches" / batch.tenant_id / batch.id
        output, errors, index = directory / "output.jsonl", directory / "errors.jsonl", directory / INDEX
        lines = await asyncio.to_thread(self._input_lines, batch)
        if lines is None:
            failure: dict[str, Any] = {"code": "input_file_missing", "line": None,
                                       "message": f"The input file {batch.input_file_id} is gone."}
            await asyncio.to_thread(self._finish, batch.id, "failed", output, errors, failure)
            return
        done, counts = await asyncio.to_thread(_written, output, errors, index)
        pending = [line for line in lines if line.custom_id not in done]
        # Counted once per claim, then kept as lines are written.
        self._counts[batch.id] = counts
        transport = httpx.ASGITransport(app=self._wrapped)
        async with httpx.AsyncClient(transport=transport, base_url="http://batch.internal") as client:
            for start in range(0, len(pending), self._chunk):
                # This claim's share is served, or the front is stopping (SIGTERM waits for one chunk, not a
                # share): the batch goes back in line.
                if start >= self._share or self._loop.stopping:
                    await asyncio.to_thread(self._release, batch.id)
                    return
                state = await asyncio.to_thread(self._state, batch.id)
                if state is None or state.status == "cancelling" or clock.now_s() >= state.expires_at:
                    break
                principal = await asyncio.to_thread(self._principal, state)
                if principal is None:  # the tenant is suspended: the lease lapses and a later pass looks again
                    return
                if not await self._serve_chunk(client, principal, batch, pending[start:start + self._chunk],
                                               output, errors, index):
                    return
                done.update(line.custom_id for line in pending[start:start + self._chunk])
        state = await asyncio.to_thread(self._state, batch.id)
        if state is None:
            return
        if state.status == "cancelling":
            final = "cancelled"
        elif clock.now_s() >= state.expires_at and len(done) < len(lines):
            final = "expired"
        else:
            final = "completed"
        await asyncio.to_thread(self._finish, batch.id, final, output, errors, None)

    async def _serve_chunk(self, client: httpx.AsyncClient, principal: Principal, batch: Batch,
                           chunk: list[BatchLine], output: Path, errors: Path, index: Path) -> bool:
        """Serve ``chunk``, write its answers, renew the lease; False when this pass must end here (the lease
        went to another runner, a line was refused for quota, or a part the lines need is unavailable)."""
        limit = asyncio.Semaphore(self._concurrency)
        # Batch rows wait behind interactive ones, so a chunk may take long under load: the lease is renewed
        # while it is served, not only after, or another front would claim the batch and serve the same lines.
        beat = asyncio.create_task(self._heartbeat(batch.id))
        try:
            answers = await asyncio.gather(*(self._serve(client, limit, principal, batch, line) for line in chunk))
        finally:
            beat.cancel()
        if await asyncio.to_thread(self._state, batch.id) is None:
            return False  # the lease went to another runner meanwhile: it serves these lines, this one writes none
        # A 5xx or a 429 other than insufficient_quota (engine down, overloaded) is not the line's answer: it is
        # left unwritten, so a later pass serves it again (it was not billed).
        later = [a for _, a in answers if _retryable(a)]
        answers = [(ok, a) for ok, a in answers if not _retryable(a)]
        kept = {a["custom_id"] for _, a in answers}
        chunk = [line for line in chunk if line.custom_id in kept]
        written = [a for ok, a in answers if ok], [a for ok, a in answers if not ok]
        counts = self._counts[batch.id]
        counts[0] += len(written[0])
        counts[1] += len(written[1])
        await asyncio.to_thread(_append_chunk, output, errors, index, written, counts)
        refused = next(((line, a) for line, (ok, a) in zip(chunk, answers, strict=True)
                        if not ok and a["error"]["code"] == "insufficient_quota"), None)
        if not await asyncio.to_thread(self._progress, batch.id, counts[0], counts[1]):
            return False  # the lease went to another runner
        if refused is not None:
            line, answer = refused
            failure = {"code": "insufficient_quota", "message": answer["error"]["message"], "line": line.line}
            await asyncio.to_thread(self._finish, batch.id, "failed", output, errors, failure)
            return False
        if later:  # something the lines need is unavailable: hand the batch back and try again later
            log.warning("batch %s: %d lines answered %s; retried on a later pass", batch.id, len(later),
                        later[0]["response"]["status_code"])
            await asyncio.to_thread(self._release, batch.id)
            return False
        return True

    async def _serve(self, client: httpx.AsyncClient, limit: asyncio.Semaphore, principal: Principal,
                     batch: Batch, line: BatchLine) -> tuple[bool, dict[str, Any]]:
        request_id = batches.line_request_id(batch.id, line.custom_id)
        token = secrets.token_hex(8)
        self._lines[token] = (principal, request_id)
        try:
            async with limit:
                response = await client.post(line.url, content=line.body.model_dump_json(exclude_unset=True),
                                             headers={"content-type": "application/json", _LINE_HEADER: token})
        finally:
            self._lines.pop(token, None)
        try:
            body = response.json()
        except ValueError:  # every route answers JSON; anything else is the platform's fault, retried (5xx)
            body = {"error": {"message": response.text[:1000], "type": "api_error", "code": "api_error"}}
        answer: dict[str, Any] = {"id": f"batch_req_{request_id[5:29]}", "custom_id": line.custom_id,
                                  "response": {"status_code": response.status_code, "request_id": request_id,
                                               "body": body}, "error": None}
        if 200 <= response.status_code < 300:
            return True, answer
        error = body.get("error", {}) if isinstance(body, dict) else {}
        answer["error"] = {"code": error.get("code") or error.get("type") or "error",
                           "message": error.get("message", "")}
        return False, answer

    async def _wrapped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, for the runner's own requests: the line's principal and request id into the scope."""
        headers = scope.get("headers", [])
        token = next((v.decode() for k, v in headers if k == _LINE_HEADER.encode()), None)
        found = self._lines.get(token or "")
        if found is not None:
            scope = {**scope, "headers": [(k, v) for k, v in headers if k != _LINE_HEADER.encode()],
                     INTERNAL_PRINCIPAL: found[0], INTERNAL_REQUEST_ID: found[1]}
        await self._app(scope, receive, send)

    # --- the database side (in a thread) -----------------------------------------------------------------------

    def _claim(self) -> Batch | None:
        with self._services.sessions() as session:
            return batches.claim(session=session, owner=self.owner, lease_s=self._lease_s, now=clock.now_s())

    def _release(self, batch_id: str) -> None:
        with self._services.sessions() as session:
            batches.release(session=session, batch_id=batch_id, owner=self.owner, now=clock.now_s())

    def _input_lines(self, batch: Batch) -> list[BatchLine] | None:
        """The batch's lines; None when its input file is gone (deleted before the batch was created; a file a
        running batch reads cannot be deleted)."""
        settings = self._services.settings
        with self._services.sessions() as session:
            f = session.get(TenantFile, batch.input_file_id)
        path = settings.data_dir / f.path if f is not None else None
        if path is None or not path.exists():
            return None
        if self._input is not None and self._input[0] == batch.id:
            return self._input[1]
        data = path.read_bytes()
        # Validated at upload; parsed again with the same bounds (a line's body is the route's model).
        lines = parse_batch_file(data, max_inputs=settings.max_inputs_per_request,
                                 max_text_chars=settings.max_text_chars).lines
        self._input = (batch.id, lines)
        return lines

    def _state(self, batch_id: str) -> Batch | None:
        with self._services.sessions() as session:
            batch = session.get(Batch, batch_id)
            return batch if batch is not None and batch.lease_owner == self.owner else None

    def _principal(self, batch: Batch) -> Principal | None:
        """The batch's tenant as the routes need it, read afresh for every chunk (a plan, budget or credits
        change applies from the next chunk; a suspended tenant's batch waits)."""
        with self._services.sessions() as session:
            tenant = session.get(Tenant, batch.tenant_id)
        if tenant is None or tenant.status != "active":
            return None
        return Principal(key_id=batch.key_id or "", tenant_id=tenant.id, scopes=frozenset({"inference"}),
                         expires_at=None, tenant_status=tenant.status, plan=tenant.plan, rpm_limit=tenant.rpm_limit,
                         tpm_limit=tenant.tpm_limit, monthly_budget_cents=tenant.monthly_budget_cents,
                         credits_epoch=tenant.credits_epoch, batch=True)

    async def _heartbeat(self, batch_id: str) -> None:
        """Renew the lease every third of it while a chunk is served (cancelled when the chunk is done)."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            await asyncio.to_thread(self._renew, batch_id)

    def _renew(self, batch_id: str) -> bool:
        with self._services.sessions() as session:
            renewed = session.exec(update(Batch).where(col(Batch.id) == batch_id, col(Batch.lease_owner) == self.owner)
                                   .values(lease_until=clock.now_s() + self._lease_s)).rowcount == 1
            session.commit()
        return renewed

    def _progress(self, batch_id: str, completed: int, failed: int) -> bool:
        """The counts written, and the lease renewed; False if this runner no longer holds it."""
        with self._services.sessions() as session:
            renewed = session.exec(update(Batch).where(col(Batch.id) == batch_id, col(Batch.lease_owner) == self.owner)
                                   .values(completed=completed, failed=failed,
                                           lease_until=clock.now_s() + self._lease_s)).rowcount == 1
            session.commit()
        return renewed

    def _finish(self, batch_id: str, status: str, output: Path, errors: Path,
                failure: dict[str, Any] | None) -> None:
        """Register the output and error files (purpose ``batch_output``) and end the batch in ``status``, with
        its event (``batch.completed``, ``batch.failed``) in the same transaction: a crash loses neither, and a
        second call (this runner's or another's) writes neither again. The row is locked (PostgreSQL) so that a
        runner whose lease lapsed cannot end a batch another runner has claimed since."""
        now = clock.now_s()
        with self._services.sessions() as session:
            batch = session.get(Batch, batch_id, with_for_update=True)
            if batch is None or batch.lease_owner != self.owner:
                return
            batch.finalizing_at = batch.finalizing_at or now
            for path, field in ((output, "output_file_id"), (errors, "error_file_id")):
                if path.exists() and path.stat().st_size and getattr(batch, field) is None:
                    setattr(batch, field, self._register(session, batch, path))
            batch.completed, batch.failed = _count(output), _count(errors)
            batch.status = status
            setattr(batch, f"{status}_at", now)
            if failure is not None:
                batch.errors_json = json.dumps([failure])
            batch.lease_owner, batch.lease_until = None, None
            session.add(batch)
            batch_events.batch_ended(session.connection(), tenant_id=batch.tenant_id, batch_id=batch.id, status=status,
                               total=batch.total, completed=batch.completed, failed=batch.failed,
                               output_file_id=batch.output_file_id, error_file_id=batch.error_file_id)
            session.commit()

    def _register(self, session: Any, batch: Batch, path: Path) -> str:
        relative = path.relative_to(self._services.settings.data_dir)
        row = TenantFile(id=new_id("file"), tenant_id=batch.tenant_id, filename=f"{batch.id}_{path.name}",
                         purpose=OUTPUT_PURPOSE, bytes=path.stat().st_size, format="jsonl", rows=_count(path),
                         labels_json="[]", path=str(relative), created_at=clock.now_s(), task=BATCH_TASK)
        session.add(row)
        return row.id


# --- the output files --------------------------------------------------------------------------------------------


def _retryable(answer: dict[str, Any]) -> bool:
    status = answer["response"]["status_code"]
    return bool(status >= 500 or (status == 429 and answer["error"]["code"] != "insufficient_quota"))


def _append(path: Path, answers: list[dict[str, Any]]) -> int:
    """Append the answers, durably; the file's size after them."""
    if answers:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(b"".join(json.dumps(a, separators=(",", ":")).encode() + b"\n" for a in answers))
            f.flush()
            os.fsync(f.fileno())
    return path.stat().st_size if path.exists() else 0


def _append_chunk(output: Path, errors: Path, index: Path,
                  written: tuple[list[dict[str, Any]], list[dict[str, Any]]], lines: list[int]) -> None:
    """A chunk's answers into their files, then one index line: the files' sizes and line counts after them, and
    the chunk's custom_ids. A crash between the two leaves answers the index does not name: ``_written`` reads
    them from the files' tails past the last sizes the index records, and names them in a catch-up line."""
    sizes = _append(output, written[0]), _append(errors, written[1])
    _append(index, [{"sizes": sizes, "lines": lines, "ids": [a["custom_id"] for a in written[0] + written[1]]}])


def _cut_torn(path: Path) -> None:
    """Cut a torn last line (the runner died writing it); only the file's end is read."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        size, step = f.seek(0, os.SEEK_END), 1 << 16
        at = size
        while at > 0:  # back to the last newline, a block at a time
            at = max(0, at - step)
            f.seek(at)
            block = f.read(min(step, size - at))
            newline = block.rfind(b"\n")
            if newline >= 0:
                f.truncate(at + newline + 1)
                return
        f.truncate(0)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _indexed(index: Path, actual: tuple[int, int]) -> tuple[set[str], list[int], list[int]]:
    """The ids, sizes and line counts of the index up to its last line the files' ``actual`` sizes bear out; the
    index is cut after that line."""
    ids: set[str] = set()
    sizes, lines, kept = [0, 0], [0, 0], 0
    if not index.exists():
        return ids, sizes, lines
    with index.open("rb") as f:
        for raw in f:
            entry = json.loads(raw)
            if entry["sizes"][0] > actual[0] or entry["sizes"][1] > actual[1]:
                break  # the files end before this line's answers: they are served again
            ids.update(entry["ids"])
            sizes, lines, kept = entry["sizes"], list(entry["lines"]), kept + len(raw)
    if kept < index.stat().st_size:
        with index.open("r+b") as f:
            f.truncate(kept)
    return ids, sizes, lines


def _written(output: Path, errors: Path, index: Path) -> tuple[set[str], list[int]]:
    """The custom_ids the two files hold and their line counts, without reading what the index covers.

    Torn last lines are cut first. The index is read up to its last line that the files bear out (sizes no larger
    than theirs: a file cut shorter than the index says is believed over the index, which is cut to match); the
    files are read only past the sizes that line records, and what is found there (answers written by a runner
    that died before their index line, or by one that kept no index) is named in a catch-up index line, so the
    next claim does not read it again."""
    for path in (output, errors, index):
        _cut_torn(path)
    actual = (_size(output), _size(errors))
    ids, sizes, lines = _indexed(index, actual)
    found: list[str] = []
    for i, (path, start) in enumerate(zip((output, errors), sizes, strict=True)):
        if path.exists() and start < actual[i]:
            with path.open("rb") as f:
                f.seek(start)
                for raw in f:
                    if raw.strip():
                        found.append(json.loads(raw)["custom_id"])
                        lines[i] += 1
    if found:
        ids.update(found)
        _append(index, [{"sizes": list(actual), "lines": lines, "ids": found}])
    return ids, list(lines)


def _count(path: Path) -> int:
    """Lines in the file, counted a block at a time (the output of an embeddings batch is large)."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
