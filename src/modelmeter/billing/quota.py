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
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

import redis.asyncio as redis

from modelmeter.billing.counts import fieldwise
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

    async def settle(self, tenant_id: str, period: str, reservation_id: str, actual: Amount) -> None:
        """Replace the reservation by the ``actual`` usage in the committed totals; a second call does nothing."""
        ...

    async def release(self, tenant_id: str, period: str, reservation_id: str) -> None:
        """Drop the reservation (the request failed); a second call does nothing."""
        ...

    async def add_committed(self, tenant_id: str, period: str, amount: Amount) -> None:
        """Count usage that had no reservation, if the counters are known (else the baseline will include it)."""
        ...

    async def snapshot(self, tenant_id: str, period: str) -> tuple[Amount, Amount] | None:
        """(committed, reserved), or None when the counters are not known."""
        ...

    async def aclose(self) -> None:
        """Release connections, if any."""
        ...


@dataclass
class _Ledger:
    committed: Amount
    reserved: Amount = Amount()
    holds: dict[str, tuple[Amount, float]] = field(default_factory=dict)  # float-ok: id -> (amount, deadline)


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

    async def reserve(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline
    ) -> str | None:
        """Hold ``amount`` if it fits every cap; see ``QuotaStore.reserve``."""
        ledger = await self._ledger((tenant_id, period), baseline)
        self._reap(ledger)
        if not caps.admit(ledger.committed + ledger.reserved + amount):
            return None
        reservation_id = uuid.uuid4().hex
        ledger.holds[reservation_id] = (amount, self._clock() + self._hold_ttl_s)
        ledger.reserved += amount
        return reservation_id

    async def settle(self, tenant_id: str, period: str, reservation_id: str, actual: Amount) -> None:
        """Commit ``actual`` in place of the reservation; idempotent."""
        ledger = self._ledgers.get((tenant_id, period))
        if ledger is not None and self._unhold(ledger, reservation_id):
            ledger.committed += actual

    async def release(self, tenant_id: str, period: str, reservation_id: str) -> None:
        """Drop the reservation; idempotent."""
        ledger = self._ledgers.get((tenant_id, period))
        if ledger is not None:
            self._unhold(ledger, reservation_id)

    async def add_committed(self, tenant_id: str, period: str, amount: Amount) -> None:
        """Count unreserved usage if the counters are known."""
        ledger = self._ledgers.get((tenant_id, period))
        if ledger is not None:
            ledger.committed += amount

    async def snapshot(self, tenant_id: str, period: str) -> tuple[Amount, Amount] | None:
        """(committed, reserved), or None before the first reservation."""
        ledger = self._ledgers.get((tenant_id, period))
        return None if ledger is None else (ledger.committed, ledger.reserved)

    async def aclose(self) -> None:
        """Nothing to release."""

    async def _ledger(self, key: tuple[str, str], baseline: Baseline) -> _Ledger:
        ledger = self._ledgers.get(key)
        if ledger is not None:
            return ledger
        async with self._init_locks.setdefault(key, asyncio.Lock()):
            ledger = self._ledgers.get(key)
            if ledger is None:
                # setdefault: a baseline retried after a failure must never replace a live ledger.
                ledger = self._ledgers.setdefault(key, _Ledger(await baseline()))
        self._init_locks.pop(key, None)
        return ledger

    def _reap(self, ledger: _Ledger) -> None:
        # Deadlines grow with insertion order (one TTL, a monotonic clock): expired holds are at the front.
        now = self._clock()
        expired = list(itertools.takewhile(lambda item: item[1][1] <= now, ledger.holds.items()))
        for reservation_id, _ in expired:
            self._unhold(ledger, reservation_id)

    @staticmethod
    def _unhold(ledger: _Ledger, reservation_id: str) -> bool:
        hold = ledger.holds.pop(reservation_id, None)
        if hold is None:
            return False
        ledger.reserved -= hold[0]
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

# KEYS: counters hash, holds hash (id -> "requests tokens training cost"), deadlines zset (id by expiry ms).
# ARGV[1] is always the keys' TTL. Amounts travel as decimal strings and are added with HINCRBY: a Lua number
# passed back to Redis may be formatted with 14 significant digits, which would corrupt large costs.
_QUOTA_PRELUDE = """
local C = {'c_requests', 'c_tokens', 'c_training_tokens', 'c_cost_micro'}
local R = {'r_requests', 'r_tokens', 'r_training_tokens', 'r_cost_micro'}
local function touch()
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
local function incr(field, digits, sign)
  if digits ~= '0' then redis.call('HINCRBY', KEYS[1], field, sign .. digits) end
end
local function unhold(id)
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
  return true
end
"""

# ARGV: ttl, id, hold_ms, has_baseline, amount x4 (5-8), caps x4 ('' = uncapped, 9-12), baseline x4 (13-16),
# prices (17: '' = not priced, else the text ``_price_args`` writes).
_RESERVE_LUA = (
    _QUOTA_PRELUDE
    + USAGE_COST_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] == '0' then return -1 end
  redis.call('HSET', KEYS[1], C[1], ARGV[13], C[2], ARGV[14], C[3], ARGV[15], C[4], ARGV[16],
             R[1], '0', R[2], '0', R[3], '0', R[4], '0')
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', string.format('%d', now_ms), 'LIMIT', 0, 64)
for _, id in ipairs(expired) do unhold(id) end
local cur = redis.call('HMGET', KEYS[1], C[1], C[2], C[3], C[4], R[1], R[2], R[3], R[4])
local totals = {}
for i = 1, 4 do
  totals[i] = tonumber(cur[i] or '0') + tonumber(cur[4 + i] or '0') + tonumber(ARGV[4 + i])
end
if ARGV[17] ~= '' then
  -- The budget is the exact usage cost of the totals, allowances and tiers included.
  totals[4] = usage_cost(totals, read_prices(ARGV[17]))
end
for i = 1, 4 do
  local cap = ARGV[8 + i]
  local total = totals[i]
  if cap ~= '' and total > tonumber(cap) then
    touch()
    return 0
  end
end
for i = 1, 4 do incr(R[i], ARGV[4 + i], '') end
redis.call('HSET', KEYS[2], ARGV[2], table.concat({ARGV[5], ARGV[6], ARGV[7], ARGV[8]}, ' '))
redis.call('ZADD', KEYS[3], string.format('%d', now_ms + tonumber(ARGV[3])), ARGV[2])
touch()
return 1
"""
)

# ARGV: ttl, id, actual x4 (3-6).
_SETTLE_LUA = (
    _QUOTA_PRELUDE
    + """
if not unhold(ARGV[2]) then return 0 end
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
if not unhold(ARGV[2]) then return 0 end
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

_COUNTER_FIELDS = (
    *(f"c_{name}" for name in ("requests", "tokens", "training_tokens", "cost_micro")),
    *(f"r_{name}" for name in ("requests", "tokens", "training_tokens", "cost_micro")),
)


def _amount_args(amount: Amount) -> list[str]:
    return [str(v) for v in amount.values()]


def _cap_args(caps: Caps) -> list[str]:
    return ["" if v is None else str(v) for v in caps.values()]


def _dimension_words(price: MeteredPrice) -> list[str]:
    if price.mode is None:  # a flat price: one unbounded graduated tier, no flat amount
        return [str(price.included), "g", "1", "-", str(price.unit_micro), "0"]
    words = [str(price.included), "v" if price.mode == "volume" else "g", str(len(price.tiers))]
    for tier in price.tiers:
        words += ["-" if tier.up_to is None else str(tier.up_to), str(tier.unit_micro), str(tier.flat_micro)]
    return words


@lru_cache(maxsize=256)
def _price_args(prices: MeteredPrices | None) -> tuple[str]:
    """ARGV 17 of the reserve script ('' = not priced): for requests, tokens, training tokens in turn, the
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

    async def reserve(
        self, tenant_id: str, period: str, amount: Amount, caps: Caps, *, baseline: Baseline
    ) -> str | None:
        """Hold ``amount`` if it fits every cap; see ``QuotaStore.reserve``."""
        reservation_id = uuid.uuid4().hex
        head = [str(self._ttl_s), reservation_id, str(self._hold_ms)]
        tail = [*_amount_args(amount), *_cap_args(caps)]
        keys = self._keys(tenant_id, period)
        prices = _price_args(caps.prices)
        outcome = await self._reserve(keys=keys, args=[*head, "0", *tail, *_amount_args(Amount()), *prices])
        if outcome == -1:
            # Absent key: the script initialises from this baseline only if no other replica got there first.
            start = await baseline()
            outcome = await self._reserve(keys=keys, args=[*head, "1", *tail, *_amount_args(start), *prices])
        return reservation_id if outcome == 1 else None

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

    def _keys(self, tenant_id: str, period: str) -> list[str]:
        counters = f"{self._prefix}{{{tenant_id}|{period}}}"
        return [counters, f"{counters}:holds", f"{counters}:deadlines"]
