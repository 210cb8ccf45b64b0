"""Rate limits (RPM and TPM per tenant) and quota reservations (hard limits and budgets).

Each part has an in-process implementation (one gateway process) and a Redis one (several replicas enforcing one
limit jointly). Every Redis operation is a single Lua script, so it is atomic without locks or retries.

Rate limiting is GCRA (the generic cell rate algorithm of redis-cell and Stripe's limiter) kept in integer
microseconds: a bucket holds the per-minute limit, refills continuously, and a request takes one request and its
tokens from two buckets at once or from neither. The Redis script reads the clock with ``TIME`` so replicas with
skewed clocks agree.

Quotas count, per ``(tenant, period)``, committed usage and in-flight reservations: a reservation is admitted only
if committed + reserved + amount stays within every cap, then settled with the actual amounts or released. Holds
that are never settled (a replica died mid-request) expire after ``hold_ttl_s``. Counters start from a baseline
read from the ledger the first time a key is seen; in Redis the baseline goes into the script, which initialises
only if the key is still absent, so replicas initialising together never double count.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import redis.asyncio as redis

WINDOW_S = 60
_WINDOW_US = WINDOW_S * 1_000_000
_QUOTA_TTL_S = 40 * 24 * 3600
_HOLD_TTL_S = 900.0  # float-ok: seconds a reservation may stay in flight before it is reaped

RateReason = Literal["requests", "tokens", "too_large"]


# --- Rate limiting -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateDecision:
    """The outcome of one rate-limit check, with what the headers report.

    ``reset_*_s`` is the time until that bucket is full again; ``retry_after_s`` the time until this request would
    be allowed (0 when allowed). A request with more tokens than the TPM limit can never be allowed: its reason is
    ``"too_large"`` and its ``retry_after_s`` is ``math.inf`` (keep it out of JSON bodies and headers).
    """

    allowed: bool
    limit_requests: int
    remaining_requests: int
    reset_requests_s: float  # float-ok
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float  # float-ok
    retry_after_s: float  # float-ok
    reason: RateReason | None = None


class RateLimiter(Protocol):
    """Per-key RPM and TPM limits."""

    async def check(
        self,
        key: str,
        *,
        rpm: int,
        tpm: int,
        tokens: int,
        now: float | None = None,  # float-ok
    ) -> RateDecision:
        """Take one request and ``tokens`` tokens if both fit (else nothing); ``now`` (seconds) is for tests."""
        ...

    async def aclose(self) -> None:
        """Release connections, if any."""
        ...


def _interval_us(limit: int) -> int:
    """Microseconds one unit occupies; the bucket holds exactly ``limit`` of them."""
    return max(1, _WINDOW_US // limit)


def _validate_rate(rpm: int, tpm: int, tokens: int) -> None:
    if rpm < 1 or tpm < 1:
        raise ValueError(f"rate limits must be positive (rpm={rpm}, tpm={tpm})")
    if tokens < 0:
        raise ValueError(f"tokens must not be negative ({tokens})")


def _lateness_us(tat: int, now: int, limit: int, cost: int) -> int:
    """How far past the bucket's capacity taking ``cost`` would go (> 0: it does not fit)."""
    interval = _interval_us(limit)
    return max(tat, now) + cost * interval - now - interval * limit


def _bucket_state(tat: int, now: int, limit: int) -> tuple[int, int]:
    """(remaining units, microseconds until full) for a bucket whose theoretical arrival time is ``tat``."""
    interval = _interval_us(limit)
    used_us = max(tat - now, 0)
    return max(0, (interval * limit - used_us) // interval), used_us


def _reason(tokens: int, tpm: int, late_r: int, late_t: int) -> RateReason | None:
    if tokens > tpm:
        return "too_large"
    if late_r <= 0 and late_t <= 0:
        return None
    return "requests" if late_r >= late_t else "tokens"


def _gcra(now: int, tat_r: int, tat_t: int, *, rpm: int, tpm: int, tokens: int) -> tuple[RateDecision, int, int]:
    """Decide one request against both buckets; returns the decision and the arrival times to store."""
    late_r = _lateness_us(tat_r, now, rpm, 1)
    late_t = _lateness_us(tat_t, now, tpm, tokens)
    reason = _reason(tokens, tpm, late_r, late_t)
    if reason is None:
        tat_r = max(tat_r, now) + _interval_us(rpm)
        tat_t = max(tat_t, now) + tokens * _interval_us(tpm)
        retry_after = 0.0  # float-ok
    else:
        retry_after = math.inf if reason == "too_large" else max(late_r, late_t) / 1_000_000
    rem_r, reset_r = _bucket_state(tat_r, now, rpm)
    rem_t, reset_t = _bucket_state(tat_t, now, tpm)
    decision = RateDecision(
        allowed=reason is None,
        limit_requests=rpm,
        remaining_requests=rem_r,
        reset_requests_s=reset_r / 1_000_000,
        limit_tokens=tpm,
        remaining_tokens=rem_t,
        reset_tokens_s=reset_t / 1_000_000,
        retry_after_s=retry_after,
        reason=reason,
    )
    return decision, tat_r, tat_t


def _to_us(seconds: float) -> int:  # float-ok
    return round(seconds * 1_000_000)


class InProcessRateLimiter:
    """GCRA buckets in a dict: for one process. Each check has no await point, so checks never interleave."""

    _SWEEP_MIN = 1024

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:  # float-ok
        self._clock = clock
        self._tats: dict[str, tuple[int, int]] = {}
        self._sweep_above = self._SWEEP_MIN

    async def check(
        self,
        key: str,
        *,
        rpm: int,
        tpm: int,
        tokens: int,
        now: float | None = None,  # float-ok
    ) -> RateDecision:
        """Take one request and ``tokens`` tokens from ``key``'s buckets if both fit, else nothing."""
        _validate_rate(rpm, tpm, tokens)
        now_us = _to_us(self._clock() if now is None else now)
        tat_r, tat_t = self._tats.get(key, (now_us, now_us))
        decision, tat_r, tat_t = _gcra(now_us, tat_r, tat_t, rpm=rpm, tpm=tpm, tokens=tokens)
        if decision.allowed:
            self._tats[key] = (tat_r, tat_t)
            self._sweep(now_us)
        return decision

    def _sweep(self, now_us: int) -> None:
        # A bucket whose arrival times have passed is full: forgetting it changes nothing, and bounds memory.
        if len(self._tats) <= self._sweep_above:
            return
        self._tats = {k: v for k, v in self._tats.items() if max(v) > now_us}
        self._sweep_above = max(self._SWEEP_MIN, 2 * len(self._tats))

    async def aclose(self) -> None:
        """Nothing to release."""


_RATE_LUA = """
local now
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[4])
end
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'r', 't')
local tat_r = tonumber(state[1]) or now
local tat_t = tonumber(state[2]) or now
local function interval(limit) return math.max(1, math.floor(60000000 / limit)) end
local new_r = math.max(tat_r, now) + interval(rpm)
local new_t = math.max(tat_t, now) + tokens * interval(tpm)
if tokens <= tpm and new_r - now <= interval(rpm) * rpm and new_t - now <= interval(tpm) * tpm then
  redis.call('HSET', KEYS[1], 'r', string.format('%d', new_r), 't', string.format('%d', new_t))
  redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((math.max(new_r, new_t) - now) / 1000) + 1000))
end
return {string.format('%d', now), string.format('%d', tat_r), string.format('%d', tat_t)}
"""


class RedisRateLimiter:
    """GCRA buckets in Redis, shared by every replica: one hash per key, expiring once the buckets are full."""

    def __init__(self, client: redis.Redis, prefix: str = "mm:rl:", *, owns_client: bool = False) -> None:
        self._client = client
        self._prefix = prefix
        self._owns_client = owns_client
        self._script = client.register_script(_RATE_LUA)

    async def check(
        self,
        key: str,
        *,
        rpm: int,
        tpm: int,
        tokens: int,
        now: float | None = None,  # float-ok
    ) -> RateDecision:
        """Take one request and ``tokens`` tokens if both fit, on Redis time unless ``now`` is given (tests)."""
        _validate_rate(rpm, tpm, tokens)
        now_arg = "" if now is None else str(_to_us(now))
        # The script decides and stores with the same arithmetic as _gcra; it returns the state it decided on.
        now_us, tat_r, tat_t = await self._script(keys=[self._prefix + key], args=[rpm, tpm, tokens, now_arg])
        decision, _, _ = _gcra(int(now_us), int(tat_r), int(tat_t), rpm=rpm, tpm=tpm, tokens=tokens)
        return decision

    async def aclose(self) -> None:
        """Close the client if this limiter created it."""
        if self._owns_client:
            await self._client.aclose()


def _ceil_s(seconds: float) -> int:  # float-ok
    return -(-_to_us(seconds) // 1_000_000)


def _duration(seconds: float) -> str:  # float-ok
    """OpenAI's reset format (Go durations, to the millisecond, rounded up): ``250ms``, ``6s``, ``1m2.5s``."""
    ms = -(-_to_us(seconds) // 1000)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_headers(d: RateDecision) -> dict[str, str]:
    """Response headers for a decision: IETF ``RateLimit``/``RateLimit-Policy`` (draft 08+), OpenAI's
    ``x-ratelimit-*``, and ``Retry-After`` when refused (not for ``too_large``: waiting will not help).

    "tokens" is not a registered quota unit, so the policy name carries the unit and ``qu`` is left out.
    """
    headers = {
        "RateLimit-Policy": f'"requests";q={d.limit_requests};w={WINDOW_S}, "tokens";q={d.limit_tokens};w={WINDOW_S}',
        "RateLimit": (
            f'"requests";r={d.remaining_requests};t={_ceil_s(d.reset_requests_s)}, '
            f'"tokens";r={d.remaining_tokens};t={_ceil_s(d.reset_tokens_s)}'
        ),
        "x-ratelimit-limit-requests": str(d.limit_requests),
        "x-ratelimit-remaining-requests": str(d.remaining_requests),
        "x-ratelimit-reset-requests": _duration(d.reset_requests_s),
        "x-ratelimit-limit-tokens": str(d.limit_tokens),
        "x-ratelimit-remaining-tokens": str(d.remaining_tokens),
        "x-ratelimit-reset-tokens": _duration(d.reset_tokens_s),
    }
    if not d.allowed and d.reason != "too_large":
        headers["Retry-After"] = str(max(1, _ceil_s(d.retry_after_s)))
    return headers


# --- Quotas and budgets --------------------------------------------------------------------------------------------


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
        return Amount(*(a + b for a, b in zip(self.values(), other.values(), strict=True)))

    def __sub__(self, other: Amount) -> Amount:
        return Amount(*(a - b for a, b in zip(self.values(), other.values(), strict=True)))


@dataclass(frozen=True)
class Caps:
    """Upper bounds per dimension (``None``: uncapped); ``max_cost_micro`` is the budget in micro-cents.

    With ``priced`` (included quantity and micro-cent unit price for requests, tokens and training tokens), the
    budget is checked against the exact usage cost of the running totals, allowances included, computed inside
    the same atomic step as the reservation: concurrent requests cannot spend past it, even where allowances run
    out. Without it, the ``cost_micro`` amounts are summed instead.
    """

    max_requests: int | None = None
    max_tokens: int | None = None
    max_training_tokens: int | None = None
    max_cost_micro: int | None = None
    priced: tuple[int, int, int, int, int, int] | None = None

    def values(self) -> tuple[int | None, int | None, int | None, int | None]:
        """The four caps, in ``Amount`` field order."""
        return (self.max_requests, self.max_tokens, self.max_training_tokens, self.max_cost_micro)

    def cost_of(self, total: Amount) -> int:
        """The usage cost of ``total`` in micro-cents (the summed ``cost_micro`` when not priced)."""
        if self.priced is None:
            return total.cost_micro
        pairs = zip(self.priced[0::2], self.priced[1::2], strict=True)
        used = (total.requests, total.tokens, total.training_tokens)
        return sum(max(0, n - included) * unit for n, (included, unit) in zip(used, pairs, strict=True))

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
# priced x6 (17-22, '' = not priced).
_RESERVE_LUA = (
    _QUOTA_PRELUDE
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
  -- The budget is the exact usage cost of the totals, allowances included (ARGV 17-22: included, unit x3).
  totals[4] = 0
  for i = 1, 3 do
    local over = totals[i] - tonumber(ARGV[15 + 2 * i])
    if over > 0 then totals[4] = totals[4] + over * tonumber(ARGV[16 + 2 * i]) end
  end
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


def _priced_args(caps: Caps) -> list[str]:
    return [str(v) for v in caps.priced] if caps.priced is not None else [""] * 6


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
        priced = _priced_args(caps)
        outcome = await self._reserve(keys=keys, args=[*head, "0", *tail, *_amount_args(Amount()), *priced])
        if outcome == -1:
            # Absent key: the script initialises from this baseline only if no other replica got there first.
            start = await baseline()
            outcome = await self._reserve(keys=keys, args=[*head, "1", *tail, *_amount_args(start), *priced])
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


def make_limiters(redis_url: str | None) -> tuple[RateLimiter, QuotaStore]:
    """The rate limiter and quota store for this deployment: in-process without ``redis_url``, else Redis-backed
    (each with its own client, closed by its ``aclose``)."""
    if not redis_url:
        return InProcessRateLimiter(), InProcessQuotaStore()
    limiter = RedisRateLimiter(redis.from_url(redis_url, decode_responses=True), owns_client=True)
    quotas = RedisQuotaStore(redis.from_url(redis_url, decode_responses=True), owns_client=True)
    return limiter, quotas
