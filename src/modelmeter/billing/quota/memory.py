"""The in-process quota store: counters in a dict, for one process (the embedded default)."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from modelmeter.billing.drawdown import CreditTerms, Draws, GrantBalance, Reservation, due_micro, plan_draws
from modelmeter.billing.quota.store import Baseline, QuotaStore
from modelmeter.billing.quota.values import HOLD_TTL_S, Amount, Caps


@dataclass
class _Credits:
    epoch: int = -1
    grants: dict[str, GrantBalance] = field(default_factory=dict)
    expired: dict[str, Draws] = field(default_factory=dict)  # draws of holds that lapsed unsettled


@dataclass
class _Ledger:
    committed: Amount
    credits: _Credits
    reserved: Amount = field(default_factory=Amount)
    holds: dict[str, tuple[Amount, float]] = field(default_factory=dict)  # float-ok: id -> (amount, deadline)
    draws: dict[str, Draws] = field(default_factory=dict)
    drawn_micro: int = 0  # the period's credit draws, held and settled (drawdown.due_micro)


class InProcessQuotaStore(QuotaStore):
    """Counters in a dict, for one process. Updates have no await point, so they never interleave; a lock per key
    makes concurrent first calls await a single baseline."""

    def __init__(
        self,
        *,
        hold_ttl_s: float = HOLD_TTL_S,  # float-ok
        clock: Callable[[], float] = time.monotonic,  # float-ok
    ) -> None:
        self._hold_ttl_s = hold_ttl_s
        self._clock = clock
        self._ledgers: dict[tuple[str, str], _Ledger] = {}
        self._init_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._credits: dict[str, _Credits] = {}
        self._credit_locks: dict[str, asyncio.Lock] = {}

    async def reserve_drawing(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline,
        credits: CreditTerms | None = None, reservation_id: str | None = None,
    ) -> Reservation | None:
        """Hold ``amount`` if it fits every cap, drawing credits; see ``QuotaStore.reserve_drawing``."""
        ledger = await self._ledger((tenant_id, period), baseline, None if credits is None else credits.drawn)
        if credits is not None:
            await self._load_credits(tenant_id, credits)
        # No await from here on: the check and the holds are one step.
        self._reap(ledger)
        before = ledger.committed + ledger.reserved
        if not caps.admit(before + amount):
            return None
        draws: Draws = ()
        if credits is not None:
            grants = ledger.credits.grants
            due = due_micro(marginal_micro=caps.marginal_cost(before, amount),
                            cost_after_micro=caps.cost_of(before + amount), drawn_micro=ledger.drawn_micro)
            planned = plan_draws(grants.values(), due, now=credits.now, prepaid=credits.prepaid)
            if planned is None:
                return None
            for grant_id, micro in planned:
                grants[grant_id].remaining_micro -= micro
                ledger.drawn_micro += micro
            draws = planned
        reservation_id = reservation_id or uuid.uuid4().hex
        ledger.holds[reservation_id] = (amount, self._clock() + self._hold_ttl_s)
        ledger.reserved += amount
        if draws:
            ledger.draws[reservation_id] = draws
        return Reservation(reservation_id, draws)

    async def _load_credits(self, tenant_id: str, credits: CreditTerms) -> None:
        state = self._credits.setdefault(tenant_id, _Credits())
        if state.epoch >= credits.epoch:
            return
        async with self._credit_locks.setdefault(tenant_id, asyncio.Lock()):
            if state.epoch < credits.epoch:
                for grant in await credits.load():
                    state.grants.setdefault(grant.id, grant)  # a held grant's own balance is the current one
                state.epoch = credits.epoch

    async def expired_draws(self, tenant_id: str) -> dict[str, Draws]:
        """Draws of holds that lapsed unsettled; see ``QuotaStore.expired_draws``."""
        state = self._credits.get(tenant_id)
        return {} if state is None else dict(state.expired)

    async def resolve_expired(self, tenant_id: str, served: dict[str, bool]) -> None:
        """Keep or return expired draws; see ``QuotaStore.resolve_expired``."""
        state = self._credits.get(tenant_id)
        if state is None:
            return
        for reservation_id, was_served in served.items():
            draws = state.expired.pop(reservation_id, ())
            if not was_served:
                for grant_id, micro in draws:
                    if grant_id in state.grants:
                        state.grants[grant_id].remaining_micro += micro

    async def credit_balances(self, tenant_id: str) -> dict[str, int] | None:
        """What is left of each grant held for the tenant; see ``QuotaStore.credit_balances``."""
        state = self._credits.get(tenant_id)
        if state is None or state.epoch < 0:
            return None
        return {grant.id: grant.remaining_micro for grant in state.grants.values()}

    async def settle(self, tenant_id: str, period: str, reservation_id: str, actual: Amount) -> None:
        """Commit ``actual`` in place of the reservation; idempotent."""
        ledger = self._ledgers.get((tenant_id, period))
        if ledger is not None and _settle_hold(ledger, reservation_id):
            ledger.committed += actual

    async def release(self, tenant_id: str, period: str, reservation_id: str) -> None:
        """Drop the reservation; idempotent."""
        ledger = self._ledgers.get((tenant_id, period))
        if ledger is not None:
            _release_hold(ledger, reservation_id)

    async def add_committed(self, tenant_id: str, period: str, amount: Amount) -> None:
        """Count unreserved usage if the counters are known."""
        ledger = self._ledgers.get((tenant_id, period))
        if ledger is not None:
            ledger.committed += amount

    async def add_committed_many(self, items: Sequence[tuple[str, str, Amount]]) -> None:
        for tenant_id, period, amount in items:
            await self.add_committed(tenant_id, period, amount)

    async def snapshot(self, tenant_id: str, period: str) -> tuple[Amount, Amount] | None:
        """(committed, reserved), or None before the first reservation."""
        ledger = self._ledgers.get((tenant_id, period))
        return None if ledger is None else (ledger.committed, ledger.reserved)

    async def aclose(self) -> None:
        """Nothing to release."""

    async def _ledger(self, key: tuple[str, str], baseline: Baseline,
                      drawn: Callable[[], Awaitable[int]] | None) -> _Ledger:
        ledger = self._ledgers.get(key)
        if ledger is not None:
            return ledger
        async with self._init_locks.setdefault(key, asyncio.Lock()):
            ledger = self._ledgers.get(key)
            if ledger is None:
                # setdefault: a baseline retried after a failure must never replace a live ledger.
                start = await baseline()
                drawn_micro = 0 if drawn is None else await drawn()
                credits = self._credits.setdefault(key[0], _Credits())
                ledger = self._ledgers.setdefault(key, _Ledger(start, credits, drawn_micro=drawn_micro))
        self._init_locks.pop(key, None)
        return ledger

    def _reap(self, ledger: _Ledger) -> None:
        # Deadlines grow with insertion order (one TTL, a monotonic clock): expired holds are at the front.
        now = self._clock()
        expired = list(itertools.takewhile(lambda item: item[1][1] <= now, ledger.holds.items()))
        for reservation_id, _ in expired:
            _lapse_hold(ledger, reservation_id)


# The three ways a hold ends, as in lua/prelude.lua (settle_hold, release_hold, lapse_hold): change both together.


def _drop_hold(ledger: _Ledger, reservation_id: str) -> Draws | None:
    """Take the hold's amounts off the reserved totals; its draws (``()`` when it drew none), or None when there is
    no such hold (settled, released or lapsed already)."""
    hold = ledger.holds.pop(reservation_id, None)
    if hold is None:
        return None
    ledger.reserved -= hold[0]
    return ledger.draws.pop(reservation_id, ())


def _settle_hold(ledger: _Ledger, reservation_id: str) -> bool:
    """Served: the draws stay drawn."""
    return _drop_hold(ledger, reservation_id) is not None


def _release_hold(ledger: _Ledger, reservation_id: str) -> bool:
    """Failed: the draws return to their grants and leave the period's drawn total."""
    draws = _drop_hold(ledger, reservation_id)
    if draws is None:
        return False
    for grant_id, micro in draws:
        ledger.credits.grants[grant_id].remaining_micro += micro
        ledger.drawn_micro -= micro
    return True


def _lapse_hold(ledger: _Ledger, reservation_id: str) -> bool:
    """Outlived its deadline unsettled: its usage row may be in the ledger, so the draws stay out of the balance
    (parked until ``resolve_expired``) and leave the period's drawn total, as its amounts left the counters."""
    draws = _drop_hold(ledger, reservation_id)
    if draws is None:
        return False
    if draws:
        ledger.credits.expired[reservation_id] = draws
        ledger.drawn_micro -= sum(micro for _, micro in draws)
    return True
