"""Record usage idempotently, in group commits: the rows of one batch share one transaction.

``LedgerWriter.record`` returns only once the row is durable, so a response is never sent for usage that
is not in the ledger; a request id recorded twice is a no-op (unique constraint, ``ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col

from modelmeter.billing.tables import UsageEvent

log = logging.getLogger("modelmeter.metering")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What a served request or a training run used (``created`` in Unix seconds)."""

    request_id: str
    tenant_id: str
    model_id: str
    created: int
    key_id: str | None = None
    kind: str = "inference"
    endpoint: str = ""
    device: str = "cpu"
    requests: int = 1
    inputs: int = 0
    tokens: int = 0
    training_tokens: int = 0
    queue_us: int = 0
    compute_us: int = 0


def period_of(ts: int) -> str:
    """The calendar month (UTC) of a Unix timestamp, as ``YYYY-MM``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


PeriodFor = Callable[[Session, Sequence[UsageRecord]], dict[str, str]]


def default_periods(_: Session, records: Sequence[UsageRecord]) -> dict[str, str]:
    return {r.request_id: period_of(r.created) for r in records}


def record_usage(*, session: Session, records: Sequence[UsageRecord], periods: PeriodFor = default_periods) -> int:
    """Insert the rows (existing request ids are skipped); returns how many were new. Caller commits."""
    if not records:
        return 0
    assigned = periods(session, records)
    values = [{**asdict(r), "period": assigned[r.request_id]} for r in records]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(UsageEvent)
        .values(values)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(col(UsageEvent.request_id))
    )
    return len(session.execute(statement).all())


class LedgerWriter:
    """Group commit: requests enqueue their rows and wait; one writer commits everything pending at once."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        periods: PeriodFor = default_periods,
        max_rows: int = 1000,
        on_commit: Callable[[Sequence[UsageRecord]], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._periods = periods
        self._max_rows = max_rows
        self._on_commit = on_commit
        self._pending: list[tuple[UsageRecord, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def record(self, record: UsageRecord) -> None:
        """Return once ``record`` is committed; raise if the commit failed (the request must not succeed)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._wake.set()
        await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                group, self._pending = self._pending[: self._max_rows], self._pending[self._max_rows :]
                await self._commit(group)

    async def _commit(self, group: list[tuple[UsageRecord, asyncio.Future[None]]]) -> None:
        records = [r for r, _ in group]
        try:
            await asyncio.to_thread(self._write, records)
        except Exception as exc:
            log.exception("ledger commit of %d rows failed", len(records))
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, future in group:
            if not future.done():
                future.set_result(None)
        if self._on_commit is not None:
            self._on_commit(records)

    def _write(self, records: list[UsageRecord]) -> None:
        with self._sessions() as session:
            record_usage(session=session, records=records, periods=self._periods)
            session.commit()

    async def close(self) -> None:
        """Commit what is pending, then stop."""
        if self._pending:
            await self._commit(self._pending)
            self._pending = []
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
