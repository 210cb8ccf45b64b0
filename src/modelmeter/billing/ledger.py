"""The usage ledger: record usage idempotently, in group commits (the rows of one batch share one transaction).

``LedgerWriter.record`` returns only once the row is durable, so a response is never sent for usage that
is not in the ledger; a request id recorded twice is a no-op (unique constraint, ``ON CONFLICT DO NOTHING``).
Admission (reserve, settle, release) is :mod:`modelmeter.billing.meter`; the calendar :mod:`modelmeter.billing.periods`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import delete as sa_delete
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col

from modelmeter.billing.drawdown import Draws
from modelmeter.billing.periods import closed_through, next_period, period_of
from modelmeter.billing.tables import CreditDraw, UsageEvent

log = logging.getLogger("modelmeter.ledger")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What a served request or a training run used (``created`` in Unix seconds)."""

    request_id: str
    tenant_id: str
    model_id: str
    created: int
    plan: str = ""
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
    credits: Draws = ()  # prepaid credits drawn: (grant id, micro-cents); written beside the row, not in it


class AlertHook(Protocol):
    """What the ledger calls with the rows it has just inserted, in their transaction (``billing.alerts.Alerts``)."""

    def fire(self, conn: Connection, written: Sequence[UsageRecord], periods: dict[str, str]) -> int: ...

    def concerns(self, written: Sequence[UsageRecord]) -> bool:
        """Whether any of these rows' tenants may have alerts (False: ``fire`` would do nothing)."""
        ...


PeriodFor = Callable[[Connection, Sequence[UsageRecord]], dict[str, str]]


def default_periods(conn: Connection, records: Sequence[UsageRecord]) -> dict[str, str]:
    """The month each record was served in, or the first open month when that one is already closed."""
    closed = closed_through(conn, lock=True)
    periods = {}
    for r in records:
        period = period_of(r.created)
        periods[r.request_id] = next_period(closed) if closed is not None and period <= closed else period
    return periods


_INSERTS = {
    name: dialect.insert(UsageEvent).on_conflict_do_nothing(index_elements=["request_id"])
    .returning(col(UsageEvent.request_id))
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_ROW_FIELDS = tuple(name for name in UsageRecord.__dataclass_fields__ if name != "credits")
_ROW_FIELDS_SET = frozenset(_ROW_FIELDS)
_DRAW_INSERT = sa_insert(CreditDraw)


def _pg_unnest_insert() -> str:
    """PostgreSQL: one fixed statement for any number of rows (one array per column through ``unnest``).

    Written by hand because it is the ledger's hot path: SQLAlchemy's multi-VALUES insert compiles and psycopg
    converts a new statement for every group size (about 10% of a saturated front's CPU in bench/fronts.py's
    profile); this one is prepared once per connection and reused."""
    table: Any = getattr(UsageEvent, "__table__")  # noqa: B009 (SQLModel declares it untyped)
    columns = [c for c in table.columns if c.name in (*_ROW_FIELDS_SET, "period")]
    names = ", ".join(c.name for c in columns)
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy's stubs
    # Strings go in as text[]: a cast to varchar(n) would silently cut an over-long value, where the column's own
    # length check raises (as the SQLAlchemy insert did).
    arrays = ", ".join(
        f"%({c.name})s::{'text' if 'CHAR' in c.type.compile(dialect=dialect) else c.type.compile(dialect=dialect)}[]"
        for c in columns)
    # Names and types come from our own table definition, never from input: no injection vector.
    return (f"INSERT INTO {UsageEvent.__tablename__} ({names}) SELECT * FROM unnest({arrays}) "  # noqa: S608
            "ON CONFLICT (request_id) DO NOTHING RETURNING request_id")


def _fire_alerts(conn: Connection, alerts: AlertHook, written: list[UsageRecord], periods: dict[str, str]) -> None:
    """Alerts never cost the usage rows: a failure is logged and the group commits without its events (the next
    usage catches them up, as alerts fire on what is reached). On PostgreSQL a failed statement aborts the
    transaction, so the hook runs in a savepoint there; on SQLite a failed statement undoes only itself."""
    if not alerts.concerns(written):
        return  # no savepoint round trips for a group of tenants without alerts
    try:
        if conn.dialect.name == "postgresql":
            with conn.begin_nested():
                alerts.fire(conn, written, periods)
        else:
            alerts.fire(conn, written, periods)
    except Exception:
        log.exception("firing usage alerts for %d rows failed; the rows are kept", len(written))


def record_usage(
    *, session: Session | Connection, records: Sequence[UsageRecord], periods: PeriodFor = default_periods,
    alerts: AlertHook | None = None,
) -> int:
    """Insert the rows (existing request ids are skipped); returns how many were new. Caller commits.

    ``alerts``: write the threshold events the new rows cross, in this same transaction.

    Core statements on the connection, built once (the ORM adds ~0.4 ms a commit on this path)."""
    if not records:
        return 0
    conn = session.connection() if isinstance(session, Session) else session
    assigned = periods(conn, records)
    values = [{name: getattr(r, name) for name in _ROW_FIELDS} | {"period": assigned[r.request_id]} for r in records]
    new = _insert_rows(conn, values)
    inserted = len(new)
    if alerts is not None and new:
        firsts: dict[str, UsageRecord] = {}  # the same id twice in one group: its first record is the row written
        for r in records:
            if r.request_id in new:
                firsts.setdefault(r.request_id, r)
        _fire_alerts(conn, alerts, list(firsts.values()), assigned)
    # A row's credit draws go in with it, only when the row itself is new: a repeat draws nothing twice.
    draws = []
    for r in records:
        if r.credits and r.request_id in new:
            new.discard(r.request_id)  # the same id twice in one group: its first record is the row written
            draws += [{"request_id": r.request_id, "grant_id": grant_id, "tenant_id": r.tenant_id,
                       "period": assigned[r.request_id], "amount_micro": micro, "created": r.created}
                      for grant_id, micro in r.credits]
    if draws:
        conn.execute(_DRAW_INSERT, draws)
    return inserted


_PG_INSERT: str | None = None
_SETTLE_CHUNK = 1000
_LEDGER_IDLE_S = 10.0  # float-ok: seconds; longer idle than this and the kept connection is checked out afresh
# After a group's commit failed, the groups that arrive within this many seconds fail at once (nothing is sent, so
# nothing is doubtful), and the first one after it tries again. Through a black-holed PostgreSQL a try costs ~1 s
# (db.PG_FAIL_FAST): without this, every group queued behind a try waited for its own, and 503s took 2.5-4.5 s
# (bench/faults.py, "postgres blackhole"); with it, at most one try is ahead of a group. A reset fails in
# milliseconds, so recovery waits at most this long.
_FAIL_FAST_S = 0.25  # float-ok: seconds
# A failed try is retried on a new connection only when it failed this fast: a connection the server or a proxy had
# closed fails at once, and the retry is what recovers it; a try that timed out would only time out again.
_RETRY_IF_FAILED_WITHIN_S = 0.5  # float-ok: seconds


def _insert_rows(conn: Connection, values: list[dict[str, object]]) -> set[str]:
    """Insert usage rows, skipping request ids already present; the ids that were new."""
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        return {request_id for (request_id,) in conn.execute(_INSERTS[conn.dialect.name], values).all()}
    global _PG_INSERT
    if _PG_INSERT is None:
        _PG_INSERT = _pg_unnest_insert()
    columns = {name: [v[name] for v in values] for name in values[0]}
    driver: Any = conn.connection.driver_connection  # psycopg's connection: the transaction is the same
    cursor = driver.cursor()
    try:
        cursor.execute(_PG_INSERT, columns, prepare=True)
        return {row[0] for row in cursor.fetchall()}
    finally:
        cursor.close()


class LedgerWriter:
    """Group commit: requests enqueue their rows and wait; one writer thread commits everything pending at once.

    A dedicated thread fed by a queue (rather than a thread-pool hop per commit) keeps a lone request's wait
    to one insert and two thread wake-ups; under load, whatever queued during a commit goes in the next one.

    A group whose commit failed on both tries is *doubtful*: its requests are answered as failed (503), but the
    first try's COMMIT may have reached the database before the connection broke (tests/faultproxy.py found it: a
    row for a request answered 503). Once the database answers again, the writer deletes whatever rows (and credit
    draws) of doubtful requests exist, so the ledger holds exactly the requests that were answered. Their holds
    were released when the commit failed, so the counters already leave them out.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        periods: PeriodFor = default_periods,
        max_rows: int = 1000,
        on_commit: Callable[[Sequence[UsageRecord]], None] | None = None,
        alerts: AlertHook | None = None,
    ) -> None:
        self._engine = sessions.kw["bind"]
        self._alerts = alerts
        self._periods = periods
        self._max_rows = max_rows
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[tuple[UsageRecord, asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Connection | None = None  # used only by the writer thread
        self._used_at = 0.0  # float-ok: monotonic time of the last commit on it
        self._doubtful: set[str] = set()  # request ids answered as failed whose rows may exist (writer thread)
        self._failed: tuple[float, Exception] | None = None  # float-ok: (monotonic time, error) of the last failure

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    async def record(self, record: UsageRecord) -> None:
        """Return once ``record`` is committed; raise if the commit failed (the request must not succeed)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put((record, future))
        await asyncio.shield(future)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:  # while rows are doubtful, wake every second to settle them once the database is back
                item = self._queue.get(timeout=1.0 if self._doubtful else None)
            except queue.Empty:
                self._settle_doubtful()
                continue
            group = []
            while item is not None:
                group.append(item)
                if len(group) >= self._max_rows:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stopping = item is None
            if group and self._failed is not None and time.monotonic() - self._failed[0] < _FAIL_FAST_S:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._resolve, group, self._failed[1])
            elif group:
                self._commit(group)
        if self._doubtful:
            self._settle_doubtful()  # a last try on the way out
        self._drop_connection()

    def _commit(self, group: list[tuple[UsageRecord, asyncio.Future[None]]]) -> None:
        records = [r for r, _ in group]
        error: Exception | None = None
        # One connection kept by the writer thread: a checkout per group would cost the pool's pre-ping round trip
        # each time. A connection idle for a while is checked out afresh (pre-ping), and a group that fails is tried
        # once more on a new connection (the server restarted, a proxy dropped it): the insert skips rows already
        # there and draws credits only for new ones, so a retry after an ambiguous commit bills nothing twice.
        sent = False  # whether any try got as far as the server (else nothing can have landed)
        for attempt in (1, 2):
            started = time.monotonic()
            try:
                if time.monotonic() - self._used_at > _LEDGER_IDLE_S:
                    self._drop_connection()
                if self._conn is None or self._conn.closed or self._conn.invalidated:
                    self._conn = self._engine.connect()
                sent = True
                with self._conn.begin():
                    record_usage(session=self._conn, records=records, periods=self._periods, alerts=self._alerts)
                self._used_at = time.monotonic()
                error = None
                break
            except Exception as exc:
                self._drop_connection()
                error = exc
                if attempt == 2 or time.monotonic() - started >= _RETRY_IF_FAILED_WITHIN_S:
                    log.exception("ledger commit of %d rows failed", len(records))
                    if sent:
                        self._doubtful.update(r.request_id for r in records)
                    break
        self._failed = None if error is None else (time.monotonic(), error)
        if error is None and self._doubtful:
            self._settle_doubtful()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._resolve, group, error)

    def _settle_doubtful(self) -> None:
        """Delete the rows (and credit draws) of requests answered as failed, if their commit reached the database."""
        ids = sorted(self._doubtful)
        removed = 0
        try:
            if self._conn is None or self._conn.closed or self._conn.invalidated:
                self._conn = self._engine.connect()
            for start in range(0, len(ids), _SETTLE_CHUNK):  # bounded statements (psycopg takes 65,535 parameters)
                chunk = ids[start:start + _SETTLE_CHUNK]
                with self._conn.begin():
                    self._conn.execute(sa_delete(CreditDraw).where(col(CreditDraw.request_id).in_(chunk)))
                    removed += self._conn.execute(
                        sa_delete(UsageEvent).where(col(UsageEvent.request_id).in_(chunk))).rowcount
                self._doubtful.difference_update(chunk)
        except Exception:
            self._drop_connection()
            log.warning("settling %d doubtful usage rows failed; retried in a second", len(self._doubtful))
        if removed:
            log.warning("removed %d usage rows whose requests were answered as failed (their commit had landed)",
                        removed)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing the ledger's broken connection failed", exc_info=True)

    def _resolve(self, group: list[tuple[UsageRecord, asyncio.Future[None]]], error: Exception | None) -> None:
        for _, future in group:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if error is None and self._on_commit is not None:
            self._on_commit([r for r, _ in group])

    async def close(self) -> None:
        """Commit what is pending, then stop the writer thread."""
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
