"""Admission on the request path: reserve quota and budget before compute, then commit the usage row (through the
ledger, :mod:`modelmeter.billing.ledger`) and settle, or release when nothing was served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter.billing.catalog import Plan
from modelmeter.billing.drawdown import CreditTerms, Draws, GrantBalance
from modelmeter.billing.ledger import LedgerWriter, UsageRecord
from modelmeter.billing.periods import period_of
from modelmeter.billing.pricing import Usage, metered_prices
from modelmeter.billing.quota import Amount, Caps, QuotaStore
from modelmeter.billing.spend import period_usage
from modelmeter.billing.tables import CreditDraw, UsageEvent
from modelmeter.errors import InsufficientQuotaError
from modelmeter.money import MICRO_PER_CENT

log = logging.getLogger("modelmeter.metering")  # the logger these messages have always gone to


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


def served_requests(*, sessions: sessionmaker[Session], request_ids: Sequence[str]) -> set[str]:
    """The request ids among ``request_ids`` that have a usage row (they were served and billed)."""
    with sessions() as session:
        query = select(UsageEvent.request_id).where(col(UsageEvent.request_id).in_(list(request_ids)))
        return set(session.exec(query).all())


def as_amount(usage: Usage) -> Amount:
    """The quota's amount of a usage, its batch part included (the budget prices that part at the discount)."""
    return Amount(requests=usage.requests, tokens=usage.tokens, training_tokens=usage.training_tokens,
                  batch_requests=usage.batch_requests, batch_tokens=usage.batch_tokens)


def ledger_totals(*, sessions: sessionmaker[Session], tenant_id: str, period: str) -> Amount:
    """The quota counters' baseline: the period's committed usage."""
    with sessions() as session:
        return as_amount(period_usage(session=session, tenant_id=tenant_id, period=period))


def ledger_drawn(*, sessions: sessionmaker[Session], tenant_id: str, period: str) -> int:
    """The period's credit draws per the ledger, micro-cents: the drawn total a quota store starts from."""
    with sessions() as session:
        query = select(func.sum(CreditDraw.amount_micro)).where(CreditDraw.tenant_id == tenant_id,
                                                                 CreditDraw.period == period)
        return int(session.exec(query).one() or 0)


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

            async def drawn() -> int:
                return await asyncio.to_thread(ledger_drawn, sessions=self._sessions, tenant_id=tenant_id,
                                               period=period)

            terms = CreditTerms(epoch=credits_epoch, now=at, prepaid=plan.prepaid, load=load, drawn=drawn)
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
        """Give the hold back; a store that cannot be reached (Redis down) is logged, not raised: the hold
        expires on its own, and the request's own answer (its error) must not become this one."""
        if hold.reservation_id is None:
            return
        try:
            await self.quota.release(hold.tenant_id, hold.period, hold.reservation_id)
        except Exception:
            log.exception("releasing the hold of %s failed; it expires on its own", hold.tenant_id)


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
