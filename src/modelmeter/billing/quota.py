"""Quota reservations: hard limits and budgets per (tenant, period), in-process or shared through Redis.

The counters hold committed usage and in-flight reservations: a reservation is admitted only if committed +
reserved + amount stays within every cap, then settled with the actual amounts or released. Holds that are never
settled (a replica died mid-request) expire after ``hold_ttl_s``. Counters start from a baseline read from the
ledger the first time a key is seen; in Redis the baseline goes into the script, which initialises only if the key
is still absent, so replicas initialising together never double count. Every Redis operation is a single Lua
script, so it is atomic without locks or retries.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import redis.asyncio as redis

from modelmeter.billing.counts import fieldwise
from modelmeter.billing.drawdown import CreditTerms, Draws, GrantBalance, Reservation, due_micro, plan_draws
from modelmeter.billing.pricing import MeteredPrice, MeteredPrices, Usage, metered_cost_micro

_QUOTA_TTL_S = 40 * 24 * 3600
_HOLD_TTL_S = 900.0  # float-ok: seconds a reservation may stay in flight before it is reaped


@dataclass(frozen=True)
class Amount:
    """Usage in the four quota dimensions; ``cost_micro`` is in micro-cents (1e-6 cent)."""

    requests: int = 0
    tokens: int = 0
    training_tokens: int = 0
    cost_micro: int = 0

    def __post_init__(self) -> None:
        if min(self.values()) < 0:
            raise ValueError(f"amounts must not be negative: {self}")

    def values(self) -> tuple[int, int, int, int]:
        """The four dimensions, in field order."""
        return (self.requests, self.tokens, self.training_tokens, self.cost_micro)

    def __add__(self, other: Amount) -> Amount:
        return fieldwise(self, other)

    def __sub__(self, other: Amount) -> Amount:
        return fieldwise(self, other, sign=-1)

    def usage(self) -> Usage:
        """The metered dimensions (requests, tokens, training tokens), as pricing's ``Usage``."""
        return Usage(self.requests, self.tokens, self.training_tokens)


@dataclass(frozen=True)
class Caps:
    """Upper bounds per dimension (``None``: uncapped); ``max_cost_micro`` is the budget in micro-cents.

    With ``prices`` (the plan's allowances and prices, flat or tiered), the budget is checked against the exact
    usage cost of the running totals (``pricing.metered_cost_micro``), allowances and tiers included, computed
    inside the same atomic step as the reservation: concurrent requests cannot spend past it, even where
    allowances run out, and a request is priced at the tier the period's usage is in. Without
    it, the ``cost_micro`` amounts are summed instead.
    """

    max_requests: int | None = None
    max_tokens: int | None = None
    max_training_tokens: int | None = None
    max_cost_micro: int | None = None
    prices: MeteredPrices | None = None

    def values(self) -> tuple[int | None, int | None, int | None, int | None]:
        """The four caps, in ``Amount`` field order."""
        return (self.max_requests, self.max_tokens, self.max_training_tokens, self.max_cost_micro)

    def cost_of(self, total: Amount) -> int:
        """The usage cost of ``total`` in micro-cents (the summed ``cost_micro`` when not priced)."""
        if self.prices is None:
            return total.cost_micro
        return metered_cost_micro(self.prices, total.usage())

    def admit(self, total: Amount) -> bool:
        """Whether ``total`` is within every capped dimension."""
        values = (*total.values()[:3], self.cost_of(total))
        return all(cap is None or value <= cap for value, cap in zip(values, self.values(), strict=True))

    def marginal_cost(self, before: Amount, amount: Amount) -> int:
        """What ``amount`` adds to the usage cost of ``before`` (may be negative under volume tiers)."""
        return self.cost_of(before + amount) - self.cost_of(before)


Baseline = Callable[[], Awaitable[Amount]]


class QuotaStore(Protocol):
    """Committed and reserved usage per (tenant, period), with atomic reserve / settle / release."""

    async def reserve(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline
    ) -> str | None:
        """Hold ``amount`` if committed + reserved + amount fits every cap and return the reservation id; else
        change nothing and return None. ``baseline`` (committed totals from the ledger) is awaited only when the
        counters are not known yet."""
        ...

    async def reserve_drawing(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline,
        credits: CreditTerms | None = None, reservation_id: str | None = None,
    ) -> Reservation | None:
        """``reserve``, and with ``credits`` draw the request's marginal cost from the tenant's grants in the same
        atomic step (``drawdown``): the reservation carries the draws; a release returns them. ``reservation_id``
        (the request's id) names the hold, so that an expired hold's draws can be checked against the ledger."""
        ...

    async def expired_draws(self, tenant_id: str) -> dict[str, Draws]:
        """The draws of holds that expired unsettled (a replica died, or its settle failed), by reservation id:
        kept out of the balance until ``resolve_expired`` learns from the ledger whether their request was
        served."""
        ...

    async def resolve_expired(self, tenant_id: str, served: dict[str, bool]) -> None:
        """Settle expired draws: a served request's draw stays drawn, an unserved one returns to its grants."""
        ...

    async def settle(self, tenant_id: str, period: str, reservation_id: str, actual: Amount) -> None:
        """Replace the reservation by the ``actual`` usage in the committed totals; a second call does nothing."""
        ...

    async def release(self, tenant_id: str, period: str, reservation_id: str) -> None:
        """Drop the reservation (the request failed); a second call does nothing."""
        ...

    async def add_committed(self, tenant_id: str, period: str, amount: Amount) -> None:
        """Count usage that had no reservation, if the counters are known (else the baseline will include it)."""
        ...

    async def add_committed_many(self, items: Sequence[tuple[str, str, Amount]]) -> None:
        """:meth:`add_committed` for several (tenant, period, amount) at once (one round trip on Redis)."""
        ...

    async def snapshot(self, tenant_id: str, period: str) -> tuple[Amount, Amount] | None:
        """(committed, reserved), or None when the counters are not known."""
        ...

    async def credit_balances(self, tenant_id: str) -> dict[str, int] | None:
        """What is left of each grant the store holds for the tenant (micro-cents, in-flight draws taken), or
        None when it holds none."""
        ...

    async def aclose(self) -> None:
        """Release connections, if any."""
        ...


@dataclass
class _Credits:
    epoch: int = -1
    grants: dict[str, GrantBalance] = field(default_factory=dict)
    expired: dict[str, Draws] = field(default_factory=dict)  # draws of holds that lapsed unsettled


@dataclass
class _Ledger:
    committed: Amount
    credits: _Credits
    reserved: Amount = Amount()
    holds: dict[str, tuple[Amount, float]] = field(default_factory=dict)  # float-ok: id -> (amount, deadline)
    draws: dict[str, Draws] = field(default_factory=dict)
    drawn_micro: int = 0  # the period's credit draws, held and settled (drawdown.due_micro)


class InProcessQuotaStore:
    """Counters in a dict, for one process. Updates have no await point, so they never interleave; a lock per key
    makes concurrent first calls await a single baseline."""

    def __init__(
        self,
        *,
        hold_ttl_s: float = _HOLD_TTL_S,  # float-ok
        clock: Callable[[], float] = time.monotonic,  # float-ok
    ) -> None:
        self._hold_ttl_s = hold_ttl_s
        self._clock = clock
        self._ledgers: dict[tuple[str, str], _Ledger] = {}
        self._init_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._credits: dict[str, _Credits] = {}
        self._credit_locks: dict[str, asyncio.Lock] = {}

    async def reserve(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline
    ) -> str | None:
        """Hold ``amount`` if it fits every cap; see ``QuotaStore.reserve``."""
        reservation = await self.reserve_drawing(tenant_id, period, amount, caps, baseline=baseline)
        return None if reservation is None else reservation.id

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
        if ledger is not None and self._unhold(ledger, reservation_id, refund=False):
            ledger.committed += actual

    async def release(self, tenant_id: str, period: str, reservation_id: str) -> None:
        """Drop the reservation; idempotent."""
        ledger = self._ledgers.get((tenant_id, period))
        if ledger is not None:
            self._unhold(ledger, reservation_id, refund=True)

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
            draws = ledger.draws.get(reservation_id, ())
            self._unhold(ledger, reservation_id, refund=False)
            if draws:  # its usage row may be in the ledger: the draw stays out of the balance until checked
                ledger.credits.expired[reservation_id] = draws
                # and out of the period's drawn total, as its usage is out of the counters (Redis does the same)
                ledger.drawn_micro -= sum(micro for _, micro in draws)

    @staticmethod
    def _unhold(ledger: _Ledger, reservation_id: str, *, refund: bool) -> bool:
        """Drop a hold; ``refund`` returns its credit draws to their grants (a release)."""
        hold = ledger.holds.pop(reservation_id, None)
        if hold is None:
            return False
        ledger.reserved -= hold[0]
        draws = ledger.draws.pop(reservation_id, ())
        if refund:
            for grant_id, micro in draws:
                ledger.credits.grants[grant_id].remaining_micro += micro
                ledger.drawn_micro -= micro
        return True


# The Lua mirror of pricing.metered_cost_micro (change both together): the usage cost of ``used`` (requests, tokens,
# training tokens) given ``prices`` (for each dimension in that order: {included, volume, tiers = {{up_to, unit,
# flat}, ...}}; a flat price is one unbounded graduated tier without flat amount; ``read_prices`` builds it from the
# text ``_price_args`` writes). Graduated: each tier prices the units in (previous up_to, up_to] plus its flat
# amount once reached; volume: every unit at the price of the tier the total falls in plus that tier's flat amount;
# the first tier is reached at 0 billable units, and an unused dimension costs nothing. Lua numbers are doubles:
# exact below 2^53 micro-cents (about 90 million dollars), as are the totals the reserve script compares.
USAGE_COST_LUA = """
-- Mirrors modelmeter.billing.pricing.metered_cost_micro: change both together.
local function read_prices(text)
  local words = {}
  for word in string.gmatch(text, '%S+') do words[#words + 1] = word end
  local prices, at = {}, 1
  for d = 1, 3 do
    local price = {included = tonumber(words[at]), volume = words[at + 1] == 'v', tiers = {}}
    local count = tonumber(words[at + 2])
    at = at + 3
    for k = 1, count do
      local up_to = words[at] == '-' and math.huge or tonumber(words[at])
      price.tiers[k] = {up_to, tonumber(words[at + 1]), tonumber(words[at + 2])}
      at = at + 3
    end
    prices[d] = price
  end
  return prices
end
local function dimension_cost(used, price)
  if used == 0 then return 0 end
  local billable = math.max(0, used - price.included)
  local tiers = price.tiers
  if price.volume then
    for k = 1, #tiers do
      local tier = tiers[k]
      if billable <= tier[1] then return billable * tier[2] + tier[3] end
    end
  end
  local cost, lower = 0, 0
  for k = 1, #tiers do
    local tier = tiers[k]
    if k > 1 and billable <= lower then break end
    cost = cost + (math.min(billable, tier[1]) - lower) * tier[2] + tier[3]
    lower = tier[1]
  end
  return cost
end
local function usage_cost(used, prices)
  local cost = 0
  for i = 1, 3 do cost = cost + dimension_cost(used[i], prices[i]) end
  return cost
end
"""

# KEYS: counters hash, holds hash (id -> "requests tokens training cost", "d:" id -> "grant micro grant micro ..."),
# deadlines zset (id by expiry ms), the tenant's credits hash ("epoch"; "r:" grant -> micro-cents left; "m:" grant ->
# "rank expires_at", expires_at 0 = never). ARGV[1] is always the keys' TTL. Amounts travel as decimal strings and
# are added with HINCRBY: a Lua number passed back to Redis may be formatted with 14 significant digits, which would
# corrupt large costs.
_QUOTA_PRELUDE = """
local C = {'c_requests', 'c_tokens', 'c_training_tokens', 'c_cost_micro'}
local R = {'r_requests', 'r_tokens', 'r_training_tokens', 'r_cost_micro'}
local function touch()
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
local function incr(field, digits, sign)
  if digits ~= '0' then redis.call('HINCRBY', KEYS[1], field, sign .. digits) end
end
-- refund: true returns the hold's credit draws to their grants (a release), false keeps them drawn (a settle),
-- 'expired' parks them under "x:" id in the credits hash, out of the balance, until the ledger says whether the
-- request was served (resolve_expired). A release or an expiry takes the draws off the period's drawn total
-- (``d_micro``: the draws of the usage the counters hold), as it takes the hold's amounts off the reserved ones.
local function unhold(id, refund)
  local hold = redis.call('HGET', KEYS[2], id)
  if not hold then return false end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  if redis.call('EXISTS', KEYS[1]) == 1 then
    local i = 0
    for digits in string.gmatch(hold, '%d+') do
      i = i + 1
      incr(R[i], digits, '-')
    end
  end
  local drawn = redis.call('HGET', KEYS[2], 'd:' .. id)
  if drawn then
    redis.call('HDEL', KEYS[2], 'd:' .. id)
    if refund == 'expired' then
      redis.call('HSET', KEYS[4], 'x:' .. id, drawn)
    end
    local counted = redis.call('EXISTS', KEYS[1]) == 1
    for grant, digits in string.gmatch(drawn, '(%S+) (%d+)') do
      if refund == true and redis.call('HEXISTS', KEYS[4], 'm:' .. grant) == 1 then
        redis.call('HINCRBY', KEYS[4], 'r:' .. grant, digits)
      end
      if refund and counted then redis.call('HINCRBY', KEYS[1], 'd_micro', '-' .. digits) end
    end
  end
  return true
end
"""

# The Lua mirror of drawdown.plan_draws (change both together): the live grants with something left, in draw
# order, and what they hold in all.
DRAW_LUA = """
-- Mirrors modelmeter.billing.drawdown.plan_draws: change both together.
local function live_grants(now)
  local grants, total = {}, 0
  local flat = redis.call('HGETALL', KEYS[4])
  for i = 1, #flat, 2 do
    local field = flat[i]
    if string.sub(field, 1, 2) == 'm:' then
      local id = string.sub(field, 3)
      local rank, expires = string.match(flat[i + 1], '(%S+) (%d+)')
      local left = tonumber(redis.call('HGET', KEYS[4], 'r:' .. id) or '0')
      expires = tonumber(expires)
      if left > 0 and (expires == 0 or expires > now) then
        grants[#grants + 1] = {id, rank, left}
        total = total + left
      end
    end
  end
  table.sort(grants, function(a, b) return a[2] < b[2] end)
  return grants, total
end
"""

# ARGV: ttl, id, hold_ms, has_baseline, amount x4 (5-8), caps x4 ('' = uncapped, 9-12), baseline x4 (13-16),
# credit terms (17: JSON {"epoch", "now", "prepaid", "grants"?: [[id, rank, expires_at, "micro"], ...]}, '' = none),
# prices (18: '' = not priced, else the text ``_price_args`` writes), the period's drawn baseline (19, micro-cents).
# The counters hash also keeps ``d_micro``: the period's credit draws, held and settled (``drawdown.due_micro``).
# Returns -1: counters unknown (send a baseline); -2: grants unknown (send them); 0: refused; {1, grant, micro, ...}.
_RESERVE_LUA = (
    _QUOTA_PRELUDE
    + USAGE_COST_LUA
    + DRAW_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] == '0' then return -1 end
  redis.call('HSET', KEYS[1], C[1], ARGV[13], C[2], ARGV[14], C[3], ARGV[15], C[4], ARGV[16],
             R[1], '0', R[2], '0', R[3], '0', R[4], '0', 'd_micro', ARGV[19])
end
local terms = nil
if ARGV[17] ~= '' then
  terms = cjson.decode(ARGV[17])
  if tonumber(redis.call('HGET', KEYS[4], 'epoch') or '-1') < terms.epoch then
    if terms.grants == nil then return -2 end
    for _, g in ipairs(terms.grants) do
      -- Only grants not held yet: a held grant's balance is more current than the ledger's.
      if redis.call('HSETNX', KEYS[4], 'r:' .. g[1], g[4]) == 1 then
        redis.call('HSET', KEYS[4], 'm:' .. g[1], g[2] .. ' ' .. string.format('%d', g[3]))
      end
    end
    redis.call('HSET', KEYS[4], 'epoch', string.format('%d', terms.epoch))
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%d', now_ms), 'LIMIT', 0, 64)
for _, id in ipairs(expired) do unhold(id, 'expired') end
local cur = redis.call('HMGET', KEYS[1], C[1], C[2], C[3], C[4], R[1], R[2], R[3], R[4])
local before, totals = {}, {}
for i = 1, 4 do
  before[i] = tonumber(cur[i] or '0') + tonumber(cur[4 + i] or '0')
  totals[i] = before[i] + tonumber(ARGV[4 + i])
end
local prices = nil
if ARGV[18] ~= '' then prices = read_prices(ARGV[18]) end
local cost_after = totals[4]
if prices then
  -- The budget is the exact usage cost of the totals, allowances and tiers included.
  cost_after = usage_cost(totals, prices)
end
for i = 1, 4 do
  local cap = ARGV[8 + i]
  local total = totals[i]
  if i == 4 then total = cost_after end
  if cap ~= '' and total > tonumber(cap) then
    touch()
    return 0
  end
end
local drawn = {}
if terms then
  local due = cost_after - before[4]
  if prices then due = cost_after - usage_cost(before, prices) end
  -- Mirrors drawdown.due_micro: never past the period's cost less what it has drawn.
  due = math.min(due, cost_after - tonumber(redis.call('HGET', KEYS[1], 'd_micro') or '0'))
  if due > 0 then
    local grants, available = live_grants(terms.now)
    if terms.prepaid and available < due then
      touch()
      return 0
    end
    for _, g in ipairs(grants) do
      if due <= 0 then break end
      local take = math.min(due, g[3])
      drawn[#drawn + 1] = g[1]
      drawn[#drawn + 1] = string.format('%d', take)
      due = due - take
    end
  end
end
for i = 1, 4 do incr(R[i], ARGV[4 + i], '') end
redis.call('HSET', KEYS[2], ARGV[2], table.concat({ARGV[5], ARGV[6], ARGV[7], ARGV[8]}, ' '))
redis.call('ZADD', KEYS[3], string.format('%d', now_ms + tonumber(ARGV[3])), ARGV[2])
if #drawn > 0 then
  for i = 1, #drawn, 2 do
    redis.call('HINCRBY', KEYS[4], 'r:' .. drawn[i], '-' .. drawn[i + 1])
    redis.call('HINCRBY', KEYS[1], 'd_micro', drawn[i + 1])
  end
  redis.call('HSET', KEYS[2], 'd:' .. ARGV[2], table.concat(drawn, ' '))
end
touch()
local out = {1}
for i = 1, #drawn do out[#out + 1] = drawn[i] end
return out
"""
)

# ARGV: ttl, id, actual x4 (3-6).
_SETTLE_LUA = (
    _QUOTA_PRELUDE
    + """
if not unhold(ARGV[2], false) then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 1, 4 do incr(C[i], ARGV[2 + i], '') end
end
touch()
return 1
"""
)

# ARGV: ttl, id.
_RELEASE_LUA = (
    _QUOTA_PRELUDE
    + """
if not unhold(ARGV[2], true) then return 0 end
touch()
return 1
"""
)

# ARGV: ttl, amount x4 (2-5).
_ADD_COMMITTED_LUA = (
    _QUOTA_PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, 4 do incr(C[i], ARGV[1 + i], '') end
touch()
return 1
"""
)

# KEYS: the tenant's credits hash. ARGV: reservation id, '1' (served: keep the draw) or '0' (return it), ...
_RESOLVE_LUA = """
for i = 1, #ARGV, 2 do
  local drawn = redis.call('HGET', KEYS[1], 'x:' .. ARGV[i])
  if drawn then
    redis.call('HDEL', KEYS[1], 'x:' .. ARGV[i])
    if ARGV[i + 1] == '0' then
      for grant, digits in string.gmatch(drawn, '(%S+) (%d+)') do
        if redis.call('HEXISTS', KEYS[1], 'm:' .. grant) == 1 then
          redis.call('HINCRBY', KEYS[1], 'r:' .. grant, digits)
        end
      end
    end
  end
end
return 1
"""

_COUNTER_FIELDS = (
    *(f"c_{name}" for name in ("requests", "tokens", "training_tokens", "cost_micro")),
    *(f"r_{name}" for name in ("requests", "tokens", "training_tokens", "cost_micro")),
)


def _amount_args(amount: Amount) -> list[str]:
    return [str(v) for v in amount.values()]


def _cap_args(caps: Caps) -> list[str]:
    return ["" if v is None else str(v) for v in caps.values()]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _credit_args(credits: CreditTerms | None, grants: list[GrantBalance] | None) -> str:
    """ARGV 17 of the reserve script: the credit terms as JSON, with the grants when the script asked for them."""
    if credits is None:
        return ""
    terms: dict[str, object] = {"epoch": credits.epoch, "now": credits.now, "prepaid": credits.prepaid}
    if grants is not None:
        terms["grants"] = [[g.id, g.rank, g.expires_at or 0, str(g.remaining_micro)] for g in grants]
    return json.dumps(terms)


def _dimension_words(price: MeteredPrice) -> list[str]:
    if price.mode is None:  # a flat price: one unbounded graduated tier, no flat amount
        return [str(price.included), "g", "1", "-", str(price.unit_micro), "0"]
    words = [str(price.included), "v" if price.mode == "volume" else "g", str(len(price.tiers))]
    for tier in price.tiers:
        words += ["-" if tier.up_to is None else str(tier.up_to), str(tier.unit_micro), str(tier.flat_micro)]
    return words


@lru_cache(maxsize=256)
def _price_args(prices: MeteredPrices | None) -> tuple[str]:
    """ARGV 18 of the reserve script ('' = not priced): for requests, tokens, training tokens in turn, the
    allowance, the mode (``g`` graduated or ``v`` volume), the number of tiers, then each tier's up_to (``-``: no
    bound), unit micro-cents and flat micro-cents, all separated by spaces. Cached: plans are few and frozen."""
    if prices is None:
        return ("",)
    dimensions = (prices.requests, prices.tokens, prices.training_tokens)
    return (" ".join(word for price in dimensions for word in _dimension_words(price)),)


class RedisQuotaStore:
    """Quota counters in Redis, shared by every replica; keys live ``ttl_s`` after their last write.

    Per (tenant, period): a hash of committed (``c_*``) and reserved (``r_*``) totals, a hash of reservation id ->
    amounts (settle and release are exact and idempotent), and a sorted set of hold deadlines. The three keys share
    a hash tag, so they stay in one slot on a cluster.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "mm:quota:",
        *,
        ttl_s: int = _QUOTA_TTL_S,
        hold_ttl_s: float = _HOLD_TTL_S,  # float-ok
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_s = ttl_s
        self._hold_ms = round(hold_ttl_s * 1000)
        self._owns_client = owns_client
        self._reserve = client.register_script(_RESERVE_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._add = client.register_script(_ADD_COMMITTED_LUA)
        self._resolve = client.register_script(_RESOLVE_LUA)

    async def reserve(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline
    ) -> str | None:
        """Hold ``amount`` if it fits every cap; see ``QuotaStore.reserve``."""
        reservation = await self.reserve_drawing(tenant_id, period, amount, caps, baseline=baseline)
        return None if reservation is None else reservation.id

    async def reserve_drawing(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline,
        credits: CreditTerms | None = None, reservation_id: str | None = None,
    ) -> Reservation | None:
        """Hold ``amount`` if it fits every cap, drawing credits; see ``QuotaStore.reserve_drawing``.

        The script says what it lacks (the baseline: counters unknown; the grants: credits epoch behind); each is
        awaited once and sent with the next call, which initialises only what is still absent."""
        reservation_id = reservation_id or uuid.uuid4().hex
        keys = self._keys(tenant_id, period)
        start: Amount | None = None
        drawn = 0
        grants: list[GrantBalance] | None = None
        for _ in range(3):
            args = [str(self._ttl_s), reservation_id, str(self._hold_ms), "0" if start is None else "1",
                    *_amount_args(amount), *_cap_args(caps), *_amount_args(start or Amount()),
                    _credit_args(credits, grants), *_price_args(caps.prices), str(drawn)]
            outcome = await self._reserve(keys=keys, args=args)
            if outcome == -1:
                start = await baseline()
                if credits is not None and credits.drawn is not None:
                    drawn = await credits.drawn()
            elif outcome == -2 and credits is not None:
                grants = await credits.load()
            elif isinstance(outcome, list):
                pairs = [(_text(outcome[i]), int(outcome[i + 1])) for i in range(1, len(outcome), 2)]
                return Reservation(reservation_id, tuple(pairs))
            else:
                return None
        raise RuntimeError("the quota store kept asking for a baseline")  # only if the keys vanish in between

    async def expired_draws(self, tenant_id: str) -> dict[str, Draws]:
        """Draws of holds that lapsed unsettled; see ``QuotaStore.expired_draws``."""
        flat: dict[bytes | str, bytes | str] = await self._client.hgetall(self._credits_key(tenant_id))
        parked = {_text(k)[2:]: _text(v).split() for k, v in flat.items() if _text(k).startswith("x:")}
        return {rid: tuple((words[i], int(words[i + 1])) for i in range(0, len(words), 2))
                for rid, words in parked.items()}

    async def resolve_expired(self, tenant_id: str, served: dict[str, bool]) -> None:
        """Keep or return expired draws; see ``QuotaStore.resolve_expired``."""
        if served:
            args = [v for rid, was in served.items() for v in (rid, "1" if was else "0")]
            await self._resolve(keys=[self._credits_key(tenant_id)], args=args)

    async def credit_balances(self, tenant_id: str) -> dict[str, int] | None:
        """What is left of each grant held for the tenant; see ``QuotaStore.credit_balances``."""
        flat: dict[bytes | str, bytes | str] = await self._client.hgetall(self._credits_key(tenant_id))
        if not flat:
            return None
        fields = {_text(k): _text(v) for k, v in flat.items()}
        return {k[2:]: int(v) for k, v in fields.items() if k.startswith("r:") and f"m:{k[2:]}" in fields}

    async def settle(self, tenant_id: str, period: str, reservation_id: str, actual: Amount) -> None:
        """Commit ``actual`` in place of the reservation; idempotent."""
        args = [str(self._ttl_s), reservation_id, *_amount_args(actual)]
        await self._settle(keys=self._keys(tenant_id, period), args=args)

    async def release(self, tenant_id: str, period: str, reservation_id: str) -> None:
        """Drop the reservation; idempotent."""
        await self._release(keys=self._keys(tenant_id, period), args=[self._ttl_s, reservation_id])

    async def add_committed(self, tenant_id: str, period: str, amount: Amount) -> None:
        """Count unreserved usage if the counters exist."""
        await self._add(keys=self._keys(tenant_id, period), args=[self._ttl_s, *_amount_args(amount)])

    async def add_committed_many(self, items: Sequence[tuple[str, str, Amount]]) -> None:
        """One pipeline (one round trip) for every (tenant, period) of a group."""
        if len(items) == 1:
            await self.add_committed(*items[0])
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant_id, period, amount in items:
                await self._add(keys=self._keys(tenant_id, period), args=[self._ttl_s, *_amount_args(amount)],
                                client=pipe)
            await pipe.execute()

    async def snapshot(self, tenant_id: str, period: str) -> tuple[Amount, Amount] | None:
        """(committed, reserved), or None when the counters do not exist."""
        values: Sequence[str | bytes | None] = await self._client.hmget(
            self._keys(tenant_id, period)[0], list(_COUNTER_FIELDS)
        )
        if all(v is None for v in values):
            return None
        counts = [int(v or 0) for v in values]
        return Amount(*counts[:4]), Amount(*counts[4:])

    async def aclose(self) -> None:
        """Close the client if this store created it."""
        if self._owns_client:
            await self._client.aclose()

    def _credits_key(self, tenant_id: str) -> str:
        return f"{self._prefix}{{{tenant_id}}}:credits"

    def _keys(self, tenant_id: str, period: str) -> list[str]:
        # One hash tag per tenant: a period's counters and the tenant's credits stay in one slot on a cluster.
        counters = f"{self._prefix}{{{tenant_id}}}:{period}"
        return [counters, f"{counters}:holds", f"{counters}:deadlines", self._credits_key(tenant_id)]
