"""Rate limits: requests and tokens per minute per key (RPM and TPM), in-process or shared through Redis.

GCRA (the generic cell rate algorithm of redis-cell and Stripe's limiter) kept in integer microseconds: a bucket
holds the per-minute limit, refills continuously, and a request takes one request and its tokens from two buckets
at once or from neither. The in-process limiter serves one gateway process; the Redis one lets several replicas
enforce one limit jointly, each decision a single Lua script (atomic without locks or retries) that reads the
clock with ``TIME`` so replicas with skewed clocks agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import redis.asyncio as redis

WINDOW_S = 60
_WINDOW_US = WINDOW_S * 1_000_000

RateReason = Literal["requests", "tokens", "too_large"]


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
        requests: int = 1,
    ) -> RateDecision:
        """Take ``requests`` (1, or 0: already taken) and ``tokens`` tokens if both fit (else nothing); ``now``
        (seconds) is for tests. A large request takes its request first, before it is tokenized, and its tokens
        in a second check (``gateway.inference``): a refused request never costs the tokenizer."""
        ...

    async def aclose(self) -> None:
        """Release connections, if any."""
        ...


def _interval_us(limit: int) -> int:
    """Microseconds one unit occupies; the bucket holds exactly ``limit`` of them."""
    return max(1, _WINDOW_US // limit)


def _validate_rate(rpm: int, tpm: int, tokens: int, requests: int = 1) -> None:
    if rpm < 1 or tpm < 1:
        raise ValueError(f"rate limits must be positive (rpm={rpm}, tpm={tpm})")
    if tokens < 0:
        raise ValueError(f"tokens must not be negative ({tokens})")
    if requests not in (0, 1):
        raise ValueError(f"requests must be 0 or 1 ({requests})")


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


def _gcra(now: int, tat_r: int, tat_t: int, *, rpm: int, tpm: int, tokens: int,
          requests: int = 1) -> tuple[RateDecision, int, int]:
    """Decide one request against both buckets; returns the decision and the arrival times to store."""
    late_r = _lateness_us(tat_r, now, rpm, requests)
    late_t = _lateness_us(tat_t, now, tpm, tokens)
    reason = _reason(tokens, tpm, late_r, late_t)
    if reason is None:
        tat_r = max(tat_r, now) + requests * _interval_us(rpm)
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


def to_us(seconds: float) -> int:  # float-ok
    """Seconds as whole microseconds (rounded to the nearest)."""
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
        requests: int = 1,
    ) -> RateDecision:
        """Take ``requests`` and ``tokens`` tokens from ``key``'s buckets if both fit, else nothing."""
        _validate_rate(rpm, tpm, tokens, requests)
        now_us = to_us(self._clock() if now is None else now)
        tat_r, tat_t = self._tats.get(key, (now_us, now_us))
        decision, tat_r, tat_t = _gcra(now_us, tat_r, tat_t, rpm=rpm, tpm=tpm, tokens=tokens, requests=requests)
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
local requests = tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'r', 't')
local tat_r = tonumber(state[1]) or now
local tat_t = tonumber(state[2]) or now
local function interval(limit) return math.max(1, math.floor(60000000 / limit)) end
local new_r = math.max(tat_r, now) + requests * interval(rpm)
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
        requests: int = 1,
    ) -> RateDecision:
        """Take ``requests`` and ``tokens`` tokens if both fit, on Redis time unless ``now`` is given (tests)."""
        _validate_rate(rpm, tpm, tokens, requests)
        now_arg = "" if now is None else str(to_us(now))
        # The script decides and stores with the same arithmetic as _gcra; it returns the state it decided on.
        now_us, tat_r, tat_t = await self._script(keys=[self._prefix + key],
                                                  args=[rpm, tpm, tokens, now_arg, requests])
        decision, _, _ = _gcra(int(now_us), int(tat_r), int(tat_t), rpm=rpm, tpm=tpm, tokens=tokens,
                               requests=requests)
        return decision

    async def aclose(self) -> None:
        """Close the client if this limiter created it."""
        if self._owns_client:
            await self._client.aclose()
