"""Rate limits (GCRA) and quota reservations, in-process: exact math on an injected clock, atomic under gather."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest

from modelmeter.billing.quota import Amount, Caps, InProcessQuotaStore
from modelmeter.gateway.ratelimit import InProcessRateLimiter, RateDecision
from modelmeter.gateway.ratelimit_headers import _duration, rate_headers
from modelmeter.gateway.services import make_limiters

pytestmark = pytest.mark.anyio

BIG = 10**9
PERIOD = "2026-11"



@dataclass
class Clock:
    t: float = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class CountingBaseline:
    """A baseline that yields to the loop (so concurrent first calls overlap) and counts its calls."""

    start: Amount = field(default_factory=Amount)
    calls: int = 0
    fail_first: bool = False

    async def __call__(self) -> Amount:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.fail_first and self.calls == 1:
            raise RuntimeError("database down")
        return self.start


async def test_full_bucket_bursts_exactly_the_limit() -> None:
    limiter = InProcessRateLimiter()
    decisions = [await limiter.check("t", rpm=600, tpm=BIG, tokens=1, now=0.0) for _ in range(601)]
    assert all(d.allowed for d in decisions[:600])
    assert [d.remaining_requests for d in decisions[:3]] == [599, 598, 597]
    last = decisions[-1]
    assert not last.allowed
    assert last.reason == "requests"
    assert last.remaining_requests == 0
    assert last.retry_after_s == pytest.approx(0.1)
    assert last.reset_requests_s == pytest.approx(60.0)


async def test_refill_rate_and_retry_after_are_exact() -> None:
    limiter = InProcessRateLimiter()
    for _ in range(60):
        assert (await limiter.check("t", rpm=60, tpm=BIG, tokens=1, now=0.0)).allowed
    early = await limiter.check("t", rpm=60, tpm=BIG, tokens=1, now=0.25)
    assert not early.allowed
    assert early.retry_after_s == pytest.approx(0.75)
    assert not (await limiter.check("t", rpm=60, tpm=BIG, tokens=1, now=0.999999)).allowed
    on_time = await limiter.check("t", rpm=60, tpm=BIG, tokens=1, now=0.25 + early.retry_after_s)
    assert on_time.allowed
    assert on_time.remaining_requests == 0
    assert on_time.retry_after_s == 0
    assert not (await limiter.check("t", rpm=60, tpm=BIG, tokens=1, now=1.5)).allowed
    refilled = await limiter.check("t", rpm=60, tpm=BIG, tokens=1, now=31.0)
    assert refilled.allowed
    assert refilled.remaining_requests == 29


async def test_token_retry_after_counts_the_tokens_asked_for() -> None:
    limiter = InProcessRateLimiter()
    assert (await limiter.check("t", rpm=100, tpm=6000, tokens=6000, now=0.0)).allowed
    refused = await limiter.check("t", rpm=100, tpm=6000, tokens=500, now=1.0)
    assert refused.reason == "tokens"
    assert refused.retry_after_s == pytest.approx(4.0)
    assert (await limiter.check("t", rpm=100, tpm=6000, tokens=500, now=5.0)).allowed


async def test_all_or_nothing_when_tokens_do_not_fit() -> None:
    limiter = InProcessRateLimiter()
    await limiter.check("t", rpm=10, tpm=1000, tokens=900, now=0.0)
    refused = await limiter.check("t", rpm=10, tpm=1000, tokens=200, now=0.0)
    assert not refused.allowed
    assert refused.reason == "tokens"
    assert refused.remaining_requests == 9
    assert refused.remaining_tokens == 100
    small = await limiter.check("t", rpm=10, tpm=1000, tokens=100, now=0.0)
    assert small.allowed
    assert small.remaining_requests == 8
    assert small.remaining_tokens == 0


async def test_all_or_nothing_when_requests_do_not_fit() -> None:
    limiter = InProcessRateLimiter()
    await limiter.check("t", rpm=1, tpm=1000, tokens=10, now=0.0)
    refused = await limiter.check("t", rpm=1, tpm=1000, tokens=10, now=0.0)
    assert refused.reason == "requests"
    assert refused.remaining_tokens == 990
    assert refused.retry_after_s == pytest.approx(60.0)


async def test_request_larger_than_tpm_is_refused_for_good() -> None:
    limiter = InProcessRateLimiter()
    too_large = await limiter.check("t", rpm=10, tpm=1000, tokens=1001, now=0.0)
    assert not too_large.allowed
    assert too_large.reason == "too_large"
    assert math.isinf(too_large.retry_after_s)
    assert too_large.remaining_requests == 10
    assert too_large.remaining_tokens == 1000
    assert "Retry-After" not in rate_headers(too_large)
    assert (await limiter.check("t", rpm=10, tpm=1000, tokens=1000, now=0.0)).allowed


async def test_keys_are_independent_and_inputs_validated() -> None:
    limiter = InProcessRateLimiter()
    assert (await limiter.check("a", rpm=1, tpm=10, tokens=1, now=0.0)).allowed
    assert (await limiter.check("b", rpm=1, tpm=10, tokens=1, now=0.0)).allowed
    with pytest.raises(ValueError, match="rate limits must be positive"):
        await limiter.check("a", rpm=0, tpm=10, tokens=1)
    with pytest.raises(ValueError, match="tokens must not be negative"):
        await limiter.check("a", rpm=1, tpm=10, tokens=-1)


async def test_uses_the_injected_clock_by_default() -> None:
    clock = Clock()
    limiter = InProcessRateLimiter(clock=clock)
    assert (await limiter.check("t", rpm=1, tpm=10, tokens=1)).allowed
    clock.t += 59.9
    assert not (await limiter.check("t", rpm=1, tpm=10, tokens=1)).allowed
    clock.t += 0.1
    assert (await limiter.check("t", rpm=1, tpm=10, tokens=1)).allowed


async def test_full_buckets_are_forgotten() -> None:
    limiter = InProcessRateLimiter()
    for i in range(1500):
        await limiter.check(f"old{i}", rpm=60, tpm=60, tokens=1, now=0.0)
    for i in range(1500):
        await limiter.check(f"new{i}", rpm=60, tpm=60, tokens=1, now=100.0)
    assert len(limiter._tats) == 1500
    assert all(k.startswith("new") for k in limiter._tats)


def test_headers_when_allowed() -> None:
    decision = RateDecision(
        allowed=True,
        limit_requests=600,
        remaining_requests=599,
        reset_requests_s=0.1,
        limit_tokens=1_000_000,
        remaining_tokens=999_870,
        reset_tokens_s=0.0078,
        retry_after_s=0.0,
    )
    assert rate_headers(decision) == {
        "RateLimit-Policy": '"requests";q=600;w=60, "tokens";q=1000000;w=60',
        "RateLimit": '"requests";r=599;t=1, "tokens";r=999870;t=1',
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "599",
        "x-ratelimit-reset-requests": "100ms",
        "x-ratelimit-limit-tokens": "1000000",
        "x-ratelimit-remaining-tokens": "999870",
        "x-ratelimit-reset-tokens": "8ms",
    }


async def test_headers_when_refused() -> None:
    limiter = InProcessRateLimiter()
    await limiter.check("t", rpm=2, tpm=1000, tokens=10, now=0.0)
    await limiter.check("t", rpm=2, tpm=1000, tokens=10, now=0.0)
    headers = rate_headers(await limiter.check("t", rpm=2, tpm=1000, tokens=10, now=0.5))
    assert headers["Retry-After"] == "30"  # 29.5 s, rounded up
    assert headers["RateLimit"] == '"requests";r=0;t=60, "tokens";r=988;t=1'  # 20 taken, 8.3 refilled
    assert headers["x-ratelimit-reset-requests"] == "59.5s"
    assert headers["x-ratelimit-reset-tokens"] == "700ms"


def test_retry_after_is_at_least_one_second() -> None:
    decision = RateDecision(False, 1, 0, 0.2, 10, 10, 0.0, 0.2, "requests")
    assert rate_headers(decision)["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0001, "1ms"),
        (0.25, "250ms"),
        (1.1, "1.1s"),
        (6.0, "6s"),
        (62.0, "1m2s"),
        (86.4, "1m26.4s"),
        (60.0, "1m0s"),
        (3723.0, "1h2m3s"),
    ],
)
def test_openai_durations(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


async def test_concurrent_reservations_admit_exactly_the_cap() -> None:
    store = InProcessQuotaStore()
    baseline = CountingBaseline(Amount(requests=3))
    caps = Caps(max_requests=40)
    ids = await asyncio.gather(
        *(store.reserve("t", PERIOD, Amount(requests=1), caps, baseline=baseline) for _ in range(64))
    )
    assert sum(i is not None for i in ids) == 37
    assert baseline.calls == 1
    assert await store.snapshot("t", PERIOD) == (Amount(requests=3), Amount(requests=37))


async def test_settle_commits_actual_and_frees_the_difference() -> None:
    store = InProcessQuotaStore()
    caps = Caps(max_tokens=100)
    rid = await store.reserve("t", PERIOD, Amount(requests=1, tokens=100), caps, baseline=CountingBaseline())
    assert rid is not None
    assert await store.reserve("t", PERIOD, Amount(tokens=1), caps, baseline=CountingBaseline()) is None
    await store.settle("t", PERIOD, rid, Amount(requests=1, tokens=60))
    assert await store.snapshot("t", PERIOD) == (Amount(requests=1, tokens=60), Amount())
    assert await store.reserve("t", PERIOD, Amount(tokens=40), caps, baseline=CountingBaseline()) is not None
    assert await store.reserve("t", PERIOD, Amount(tokens=1), caps, baseline=CountingBaseline()) is None


async def test_settle_and_release_are_idempotent() -> None:
    store = InProcessQuotaStore()
    caps = Caps()
    first = await store.reserve("t", PERIOD, Amount(requests=1, tokens=10), caps, baseline=CountingBaseline())
    second = await store.reserve("t", PERIOD, Amount(requests=1, tokens=20), caps, baseline=CountingBaseline())
    assert first is not None
    assert second is not None
    for _ in range(2):
        await store.settle("t", PERIOD, first, Amount(requests=1, tokens=7))
        await store.release("t", PERIOD, second)
    await store.release("t", PERIOD, first)
    await store.settle("t", PERIOD, second, Amount(requests=1, tokens=20))
    await store.settle("t", PERIOD, "unknown", Amount(requests=5))
    assert await store.snapshot("t", PERIOD) == (Amount(requests=1, tokens=7), Amount())


async def test_refusal_changes_nothing() -> None:
    store = InProcessQuotaStore()
    caps = Caps(max_requests=10, max_tokens=100)
    baseline = CountingBaseline(Amount(requests=9, tokens=50))
    assert await store.reserve("t", PERIOD, Amount(requests=1, tokens=51), caps, baseline=baseline) is None
    assert await store.snapshot("t", PERIOD) == (Amount(requests=9, tokens=50), Amount())
    assert await store.reserve("t", PERIOD, Amount(requests=1, tokens=50), caps, baseline=baseline) is not None
    assert baseline.calls == 1


async def test_a_dimension_over_its_cap_blocks_every_reservation() -> None:
    store = InProcessQuotaStore()
    caps = Caps(max_tokens=1000, max_training_tokens=100)
    assert await store.reserve("t", PERIOD, Amount(tokens=1), caps, baseline=CountingBaseline()) is not None
    await store.add_committed("t", PERIOD, Amount(training_tokens=150))
    assert await store.reserve("t", PERIOD, Amount(tokens=1), caps, baseline=CountingBaseline()) is None


async def test_budget_cap_on_cost() -> None:
    store = InProcessQuotaStore()
    caps = Caps(max_cost_micro=1_000_000)
    baseline = CountingBaseline(Amount(cost_micro=100_000))
    ids = [await store.reserve("t", PERIOD, Amount(cost_micro=300_000), caps, baseline=baseline) for _ in range(4)]
    assert [i is not None for i in ids] == [True, True, True, False]
    assert await store.reserve("t", PERIOD, Amount(cost_micro=0), caps, baseline=baseline) is not None
    assert await store.reserve("t", PERIOD, Amount(cost_micro=1), caps, baseline=baseline) is None


async def test_baseline_once_per_key_and_retried_after_a_failure() -> None:
    store = InProcessQuotaStore()
    baseline = CountingBaseline(Amount(tokens=5), fail_first=True)
    results = await asyncio.gather(
        *(store.reserve("t", PERIOD, Amount(tokens=1), Caps(), baseline=baseline) for _ in range(8)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, RuntimeError) for r in results) == 1
    assert baseline.calls == 2
    await store.reserve("t", "2026-12", Amount(tokens=1), Caps(), baseline=baseline)
    assert baseline.calls == 3
    snapshot = await store.snapshot("t", PERIOD)
    assert snapshot is not None
    assert snapshot[0] == Amount(tokens=5)


async def test_add_committed_only_once_counters_are_known() -> None:
    store = InProcessQuotaStore()
    await store.add_committed("t", PERIOD, Amount(training_tokens=1000))
    assert await store.snapshot("t", PERIOD) is None
    await store.reserve("t", PERIOD, Amount(requests=1), Caps(), baseline=CountingBaseline(Amount(requests=2)))
    await store.add_committed("t", PERIOD, Amount(training_tokens=1000))
    assert await store.snapshot("t", PERIOD) == (Amount(requests=2, training_tokens=1000), Amount(requests=1))


async def test_abandoned_holds_expire() -> None:
    clock = Clock()
    store = InProcessQuotaStore(hold_ttl_s=60.0, clock=clock)
    caps = Caps(max_requests=1)
    stale = await store.reserve("t", PERIOD, Amount(requests=1), caps, baseline=CountingBaseline())
    assert stale is not None
    assert await store.reserve("t", PERIOD, Amount(requests=1), caps, baseline=CountingBaseline()) is None
    clock.t += 60.0
    fresh = await store.reserve("t", PERIOD, Amount(requests=1), caps, baseline=CountingBaseline())
    assert fresh is not None
    await store.settle("t", PERIOD, stale, Amount(requests=1))
    assert await store.snapshot("t", PERIOD) == (Amount(), Amount(requests=1))


def test_amounts_are_non_negative_integers_that_add_up() -> None:
    with pytest.raises(ValueError, match="amounts must not be negative"):
        Amount(tokens=-1)
    assert Amount(1, 2, 3, 4) + Amount(1, 1, 1, 1) - Amount(2, 3, 4, 5) == Amount()
    assert Caps().admit(Amount(BIG, BIG, BIG, BIG))


async def test_factory_defaults_to_in_process() -> None:
    limiter, quotas = make_limiters(None)
    assert isinstance(limiter, InProcessRateLimiter)
    assert isinstance(quotas, InProcessQuotaStore)
    await limiter.aclose()
    await quotas.aclose()
