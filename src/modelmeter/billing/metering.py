"""Record usage idempotently, in group commits: the rows of one batch share one transaction.

``LedgerWriter.record`` returns only once the row is durable, so a response is never sent for usage that
is not in the ledger; a request id recorded twice is a no-op (unique constraint, ``ON CONFLICT DO NOTHING``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import func
from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter.billing.catalog import Plan
from modelmeter.billing.drawdown import CreditTerms, Draws, GrantBalance
from modelmeter.billing.pricing import Usage, metered_prices
from modelmeter.billing.quota import Amount, Caps, QuotaStore
from modelmeter.billing.tables import BillingState, CreditDraw, UsageEvent
from modelmeter.errors import InsufficientQuotaError
from modelmeter.money import MICRO_PER_CENT

log = logging.getLogger("modelmeter.metering")


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


def period_of(ts: int) -> str:
    """The calendar month (UTC) of a Unix timestamp, as ``YYYY-MM``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def period_bounds(period: str) -> tuple[int, int]:
    """``[start, end)`` of a ``YYYY-MM`` period in Unix seconds (UTC)."""
    start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return int(start.timestamp()), int(end.timestamp())


def next_period(period: str) -> str:
    return period_of(period_bounds(period)[1])


def closed_through(conn: Connection, *, lock: bool = False) -> str | None:
    """The latest closed period. ``lock`` takes the row FOR SHARE on PostgreSQL, so a concurrent close
    (which takes it FOR UPDATE) waits for this transaction and never misses its rows."""
    query = sa_select(col(BillingState.closed_through)).where(col(BillingState.id) == 1)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    return conn.execute(query).scalar()


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
_LEDGER_IDLE_S = 10.0  # float-ok: seconds; longer idle than this and the kept connection is checked out afresh


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
            item = self._queue.get()
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
            if group:
                self._commit(group)
        self._drop_connection()

    def _commit(self, group: list[tuple[UsageRecord, asyncio.Future[None]]]) -> None:
        records = [r for r, _ in group]
        error: Exception | None = None
        # One connection kept by the writer thread: a checkout per group would cost the pool's pre-ping round trip
        # each time. A connection idle for a while is checked out afresh (pre-ping), and a group that fails is tried
        # once more on a new connection (the server restarted, a proxy dropped it): the insert skips rows already
        # there and draws credits only for new ones, so a retry after an ambiguous commit bills nothing twice.
        for attempt in (1, 2):
            try:
                if time.monotonic() - self._used_at > _LEDGER_IDLE_S:
                    self._drop_connection()
                if self._conn is None or self._conn.closed or self._conn.invalidated:
                    self._conn = self._engine.connect()
                with self._conn.begin():
                    record_usage(session=self._conn, records=records, periods=self._periods, alerts=self._alerts)
                self._used_at = time.monotonic()
                error = None
                break
            except Exception as exc:
                self._drop_connection()
                error = exc
                if attempt == 2:
                    log.exception("ledger commit of %d rows failed", len(records))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._resolve, group, error)

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


# --- quota and budget: reserve before compute, settle after the row is durable ---------------------------


def quota_caps(plan: Plan, budget_cents: int | None, *, training: bool = False,
               credits: bool = False) -> Caps | None:
    """The caps a request must fit: the plan's allowances when it has a hard limit, and the tenant's budget
    (checked against the exact usage cost, allowances included). ``None`` when nothing caps the tenant and no
    credits are to be drawn (``credits``: the reservation needs the plan's prices to price the draw)."""
    if not plan.hard_limit and budget_cents is None and not credits:
        return None
    hard = plan.hard_limit
    return Caps(
        max_requests=plan.included_requests if hard and not training else None,
        max_tokens=plan.included_tokens if hard and not training else None,
        max_training_tokens=plan.included_training_tokens if hard and training else None,
        max_cost_micro=budget_cents * MICRO_PER_CENT if budget_cents is not None else None,
        prices=metered_prices(plan) if budget_cents is not None or credits else None,
    )


def period_usage(*, session: Session, tenant_id: str, period: str) -> Usage:
    """Committed usage of a tenant's period, from the ledger."""
    query = select(func.sum(UsageEvent.requests), func.sum(UsageEvent.tokens), func.sum(UsageEvent.training_tokens))
    r, t, tr = session.exec(query.where(UsageEvent.tenant_id == tenant_id, UsageEvent.period == period)).one()
    return Usage(int(r or 0), int(t or 0), int(tr or 0))


def served_requests(*, sessions: sessionmaker[Session], request_ids: Sequence[str]) -> set[str]:
    """The request ids among ``request_ids`` that have a usage row (they were served and billed)."""
    with sessions() as session:
        query = select(UsageEvent.request_id).where(col(UsageEvent.request_id).in_(list(request_ids)))
        return set(session.exec(query).all())


def as_amount(usage: Usage) -> Amount:
    return Amount(requests=usage.requests, tokens=usage.tokens, training_tokens=usage.training_tokens)


def ledger_totals(*, sessions: sessionmaker[Session], tenant_id: str, period: str) -> Amount:
    """The quota counters' baseline: the period's committed usage."""
    with sessions() as session:
        return as_amount(period_usage(session=session, tenant_id=tenant_id, period=period))


@dataclass(frozen=True, slots=True)
class Hold:
    """Quota held for one request: released on failure, settled once its usage row is committed."""

    tenant_id: str
    period: str
    amount: Amount
    reservation_id: str | None  # None: nothing caps this tenant, usage is only counted
    draws: Draws = ()  # prepaid credits the reservation drew: written with the usage row


GrantLoader = Callable[[str, int], list[GrantBalance]]  # (tenant id, now) -> live grants per the ledger


class Meter:
    """The billing side of the request path: reserve, then commit the usage row and settle (or release)."""

    def __init__(self, *, sessions: sessionmaker[Session], ledger: LedgerWriter, quota: QuotaStore,
                 grants: GrantLoader | None = None, resolve_every_s: float = 60.0) -> None:  # float-ok: seconds
        self._sessions = sessions
        self.ledger = ledger
        self.quota = quota
        self._grants = grants
        self._resolve_every_s = resolve_every_s
        self._resolved_at: dict[str, float] = {}  # float-ok: tenant -> monotonic time of the last check
        self._tasks: set[asyncio.Task[Any]] = set()
        # Usage without a reservation, counted in Redis once per loop turn for every request committed in it.
        self._uncounted: dict[tuple[str, str], Amount] = {}
        self._counting: asyncio.Task[None] | None = None

    async def reserve(self, *, tenant_id: str, plan: Plan, budget_cents: int | None, amount: Amount,
                      at: int, credits_epoch: int = 0, request_id: str | None = None) -> Hold:
        """Hold ``amount`` against the plan's hard limit and the budget, drawing prepaid credits when the tenant
        has had any (``credits_epoch`` > 0) or the plan is prepaid; 429 ``insufficient_quota`` if it does not fit
        (nothing is held then)."""
        period = period_of(at)  # the same instant stamps the usage row, so hold and row share a period
        drawing = self._grants is not None and (plan.prepaid or credits_epoch > 0)
        caps = quota_caps(plan, budget_cents, credits=drawing)
        if caps is None:
            return Hold(tenant_id, period, amount, None)

        async def baseline() -> Amount:
            return await asyncio.to_thread(ledger_totals, sessions=self._sessions, tenant_id=tenant_id, period=period)

        terms = None
        if drawing:
            loader = self._grants
            assert loader is not None

            async def load() -> list[GrantBalance]:
                return await asyncio.to_thread(loader, tenant_id, at)

            terms = CreditTerms(epoch=credits_epoch, now=at, prepaid=plan.prepaid, load=load)
        reservation = await self.quota.reserve_drawing(tenant_id, period, amount, caps, baseline=baseline,
                                                       credits=terms, reservation_id=request_id)
        if drawing:
            self._check_expired(tenant_id)
        if reservation is None:
            raise InsufficientQuotaError(
                "This request would exceed your prepaid credits, your plan's monthly quota or your budget; it was "
                "not served. Do not retry: add credits, raise the budget or change plan."
                if drawing and plan.prepaid else
                "This request would exceed your plan's monthly quota or your budget; it was not served. "
                "Do not retry: raise the budget or change plan."
            )
        return Hold(tenant_id, period, amount, reservation.id, reservation.draws)

    def _check_expired(self, tenant_id: str) -> None:
        """Now and then (``resolve_every_s`` per tenant), in the background: settle the credit draws of holds that
        expired unsettled, by asking the ledger whether their request was served (its usage row, written with the
        draws, exists). Until then those draws stay out of the balance: credits are never drawn twice."""
        now = time.monotonic()
        if now - self._resolved_at.get(tenant_id, -self._resolve_every_s) < self._resolve_every_s:
            return
        self._resolved_at[tenant_id] = now
        task = asyncio.get_running_loop().create_task(self.resolve_expired(tenant_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count_soon(self, hold: Hold) -> None:
        """Add ``hold``'s amount to the counters with the other commits of this loop turn (one round trip for a
        whole ledger group on Redis, instead of one per request; measured in bench/fronts.py)."""
        key = (hold.tenant_id, hold.period)
        self._uncounted[key] = self._uncounted.get(key, Amount()) + hold.amount
        if self._counting is None:
            self._counting = asyncio.get_running_loop().create_task(self._count())
            self._tasks.add(self._counting)
            self._counting.add_done_callback(self._tasks.discard)

    async def _count(self) -> None:
        await asyncio.sleep(0)  # the group's other requests resume in this turn: theirs go in too
        batch, self._uncounted, self._counting = self._uncounted, {}, None
        try:
            await self.quota.add_committed_many([(t, p, amount) for (t, p), amount in batch.items()])
        except Exception:
            log.exception("counting committed usage of %d tenants failed; the next baseline includes it", len(batch))

    async def aclose(self) -> None:
        """Wait for the background checks (they use the database: before the engine is disposed)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def resolve_expired(self, tenant_id: str) -> int:
        """Settle the tenant's expired draws against the ledger; returns how many were settled."""
        try:
            parked = await self.quota.expired_draws(tenant_id)
            if not parked:
                return 0
            served = await asyncio.to_thread(served_requests, sessions=self._sessions, request_ids=list(parked))
            await self.quota.resolve_expired(tenant_id, {rid: rid in served for rid in parked})
            return len(parked)
        except Exception:
            log.exception("settling expired credit draws of %s failed; retried later", tenant_id)
            return 0

    async def commit(self, hold: Hold, record: UsageRecord) -> None:
        """Make the usage row durable, then turn the hold into committed usage.

        Once the row is written the request is billed, whatever happens next: the write is shielded from
        cancellation, and a failure to settle the counters is logged, not raised (the hold expires on its own).
        """
        if hold.draws:
            record = replace(record, credits=hold.draws)
        try:
            await asyncio.shield(self.ledger.record(record))
        except asyncio.CancelledError:
            raise  # the shielded write goes on and commits: the hold is settled below only if we get there
        except Exception:
            await self.release(hold)  # the row was not written: nothing is billed, nothing is held
            raise
        if hold.reservation_id is None:
            self._count_soon(hold)
            return
        try:
            await self.quota.settle(hold.tenant_id, hold.period, hold.reservation_id, hold.amount)
        except Exception:
            log.exception("settling quota for %s failed; the hold expires on its own", record.request_id)

    async def release(self, hold: Hold) -> None:
        if hold.reservation_id is not None:
            await self.quota.release(hold.tenant_id, hold.period, hold.reservation_id)


def check_training_quota(*, plan: Plan, budget_cents: int | None, used: Amount, training_tokens: int) -> None:
    """Refuse (429 ``insufficient_quota``) a fine-tuning job whose training tokens would pass the plan's hard
    limit or the budget, given the period's ``used`` amounts (ledger plus jobs not yet finished).

    Prepaid credits pay inference as it is served; training is invoiced. So a prepaid plan (which must never
    bill what credits have not paid) refuses a job whose training tokens would cost anything beyond the plan's
    included training tokens."""
    total = used + Amount(training_tokens=training_tokens)
    caps = quota_caps(plan, budget_cents, training=True)
    if caps is not None and not caps.admit(total):
        raise InsufficientQuotaError(
            f"Training {training_tokens} tokens would exceed your plan's monthly training allowance or your budget; "
            "the job was not created. Do not retry: raise the budget or change plan."
        )
    if plan.prepaid and Caps(prices=metered_prices(plan)).marginal_cost(used, Amount(training_tokens=training_tokens)):
        raise InsufficientQuotaError(
            f"Training {training_tokens} tokens would go beyond your prepaid plan's included training tokens, and "
            "credits pay inference only; the job was not created. Change plan to fine-tune beyond the allowance."
        )
