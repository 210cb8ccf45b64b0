"""Rate limits and quota reservations on a real Redis: the in-process properties, plus replicas sharing one limit."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelmeter.billing.catalog import PRICES, Plan
from modelmeter.billing.pricing import metered_cost_micro, metered_prices
from modelmeter.billing.quota import Amount, Caps, InProcessQuotaStore, RedisQuotaStore
from modelmeter.billing.quota.redis import KEY_PREFIX
from modelmeter.gateway.ratelimit import InProcessRateLimiter, RedisRateLimiter
from modelmeter.gateway.services import make_limiters
from tests.plan_strategies import tiered_plans, with_batch_discount

REDIS_URL = os.environ.get("MODELMETER_REDIS_URL", "")
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    pytest.mark.skipif(not REDIS_URL, reason="needs a Redis: set MODELMETER_REDIS_URL (CI does)"),
]

BIG = 10**9
PERIOD = "2026-11"



@dataclass
class Replicas:
    """Clients as separate gateway replicas would hold them, all under one key prefix deleted afterwards."""

    prefix: str
    clients: list[redis.Redis] = field(default_factory=list)

    def client(self) -> redis.Redis:
        self.clients.append(redis.from_url(REDIS_URL, decode_responses=True))
        return self.clients[-1]

    def limiter(self) -> RedisRateLimiter:
        return RedisRateLimiter(self.client(), prefix=f"{self.prefix}rl:")

    def store(self, hold_ttl_s: float = 900.0) -> RedisQuotaStore:
        return RedisQuotaStore(self.client(), prefix=f"{self.prefix}quota:", hold_ttl_s=hold_ttl_s)


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    made = Replicas(prefix=f"mmtest:{uuid.uuid4().hex}:")
    yield made
    cleaner = made.client()
    keys = [key async for key in cleaner.scan_iter(match=f"{made.prefix}*")]
    if keys:
        await cleaner.delete(*keys)
    for client in made.clients:
        await client.aclose()


@dataclass
class CountingBaseline:
    start: Amount = field(default_factory=Amount)
    calls: int = 0

    async def __call__(self) -> Amount:
        self.calls += 1
        await asyncio.sleep(0.05)  # long enough for a concurrent replica to find the key absent too
        return self.start


async def test_same_decisions_as_in_process_on_an_injected_clock(replicas: Replicas) -> None:
    remote, local = replicas.limiter(), InProcessRateLimiter()
    steps = [(0.0, 400), (0.0, 500), (0.0, 200), (0.5, 50), (3.0, 10), (3.0, 1000), (3.0, 1001), (10.0, 300)]
    steps += [(10.0, 1)] * 4 + [(29.99, 1), (30.0, 1)]
    for now, tokens in steps:
        want = await local.check("t", rpm=5, tpm=1000, tokens=tokens, now=1e6 + now)
        got = await remote.check("t", rpm=5, tpm=1000, tokens=tokens, now=1e6 + now)
        assert got == want


async def test_a_request_taken_apart_from_its_tokens_decides_the_same(replicas: Replicas) -> None:
    """requests=0: the tokens of a request whose place in RPM was taken before it was tokenized."""
    remote, local = replicas.limiter(), InProcessRateLimiter()
    steps = [(0.0, 0, 1), (0.0, 400, 0), (0.0, 0, 1), (0.0, 700, 0), (0.0, 0, 1), (0.0, 0, 1), (0.0, 0, 1),
             (0.0, 0, 1), (1.0, 10, 0), (12.0, 0, 1), (12.0, 1, 1)]
    for now, tokens, requests in steps:
        want = await local.check("t", rpm=5, tpm=1000, tokens=tokens, now=1e6 + now, requests=requests)
        got = await remote.check("t", rpm=5, tpm=1000, tokens=tokens, now=1e6 + now, requests=requests)
        assert got == want, (now, tokens, requests)


async def test_burst_then_refusal_on_server_time(replicas: Replicas) -> None:
    limiter = replicas.limiter()
    decisions = [await limiter.check("t", rpm=5, tpm=BIG, tokens=1) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[-1].reason == "requests"
    assert 11.0 < decisions[-1].retry_after_s <= 12.0
    ttl_ms = await replicas.clients[0].pttl(f"{replicas.prefix}rl:t")
    assert 60_000 < ttl_ms <= 61_000


async def test_all_or_nothing_and_too_large(replicas: Replicas) -> None:
    limiter = replicas.limiter()
    await limiter.check("t", rpm=10, tpm=1000, tokens=900, now=0.0)
    refused = await limiter.check("t", rpm=10, tpm=1000, tokens=200, now=0.0)
    assert refused.reason == "tokens"
    assert refused.remaining_requests == 9
    too_large = await limiter.check("t", rpm=10, tpm=1000, tokens=1001, now=0.0)
    assert too_large.reason == "too_large"
    assert too_large.remaining_tokens == 100


async def test_two_replicas_share_one_rate_limit(replicas: Replicas) -> None:
    first, second = replicas.limiter(), replicas.limiter()
    calls = [(first if i % 2 else second).check("t", rpm=10, tpm=BIG, tokens=1) for i in range(30)]
    decisions = await asyncio.gather(*calls)
    assert sum(d.allowed for d in decisions) == 10


async def test_concurrent_reservations_across_replicas_admit_exactly_the_cap(replicas: Replicas) -> None:
    stores = [replicas.store(), replicas.store()]
    caps = Caps(max_requests=40)
    baseline = CountingBaseline(Amount(requests=3))
    ids = await asyncio.gather(
        *(stores[i % 2].reserve("t", PERIOD, Amount(requests=1), caps, baseline=baseline) for i in range(64))
    )
    assert sum(i is not None for i in ids) == 37
    assert await stores[0].snapshot("t", PERIOD) == (Amount(requests=3), Amount(requests=37))


async def test_concurrent_initialisation_does_not_double_count(replicas: Replicas) -> None:
    first, second = replicas.store(), replicas.store()
    baselines = [CountingBaseline(Amount(requests=5, cost_micro=700)) for _ in range(2)]
    ids = await asyncio.gather(
        first.reserve("t", PERIOD, Amount(requests=1), Caps(), baseline=baselines[0]),
        second.reserve("t", PERIOD, Amount(requests=1), Caps(), baseline=baselines[1]),
    )
    assert None not in ids
    assert [b.calls for b in baselines] == [1, 1]
    assert await first.snapshot("t", PERIOD) == (Amount(requests=5, cost_micro=700), Amount(requests=2))
    await first.reserve("t", PERIOD, Amount(requests=1), Caps(), baseline=baselines[0])
    assert baselines[0].calls == 1


async def test_settle_frees_the_difference_and_is_idempotent(replicas: Replicas) -> None:
    store, other = replicas.store(), replicas.store()
    caps = Caps(max_tokens=100)
    rid = await store.reserve("t", PERIOD, Amount(requests=1, tokens=100), caps, baseline=CountingBaseline())
    assert rid is not None
    assert await store.reserve("t", PERIOD, Amount(tokens=1), caps, baseline=CountingBaseline()) is None
    await asyncio.gather(*(s.settle("t", PERIOD, rid, Amount(requests=1, tokens=60)) for s in (store, other) * 3))
    await store.release("t", PERIOD, rid)
    assert await store.snapshot("t", PERIOD) == (Amount(requests=1, tokens=60), Amount())
    assert await store.reserve("t", PERIOD, Amount(tokens=40), caps, baseline=CountingBaseline()) is not None
    assert await store.reserve("t", PERIOD, Amount(tokens=1), caps, baseline=CountingBaseline()) is None


async def test_release_is_idempotent(replicas: Replicas) -> None:
    store = replicas.store()
    rid = await store.reserve("t", PERIOD, Amount(requests=1, tokens=9), Caps(), baseline=CountingBaseline())
    assert rid is not None
    for _ in range(2):
        await store.release("t", PERIOD, rid)
    await store.settle("t", PERIOD, rid, Amount(requests=1, tokens=9))
    assert await store.snapshot("t", PERIOD) == (Amount(), Amount())


async def test_budget_cap_and_large_amounts_stay_exact(replicas: Replicas) -> None:
    store = replicas.store()
    start = 123_456_789_012_345  # past 2^46: a Lua number printed with 14 digits would lose the tail
    caps = Caps(max_cost_micro=start + 1_000_000)
    baseline = CountingBaseline(Amount(cost_micro=start))
    ids = [await store.reserve("t", PERIOD, Amount(cost_micro=300_000), caps, baseline=baseline) for _ in range(4)]
    assert [i is not None for i in ids] == [True, True, True, False]
    assert ids[0] is not None
    await store.settle("t", PERIOD, ids[0], Amount(cost_micro=299_999))
    assert await store.snapshot("t", PERIOD) == (Amount(cost_micro=start + 299_999), Amount(cost_micro=600_000))


async def test_add_committed_only_once_counters_exist(replicas: Replicas) -> None:
    store = replicas.store()
    await store.add_committed("t", PERIOD, Amount(training_tokens=1000))
    assert await store.snapshot("t", PERIOD) is None
    await store.reserve("t", PERIOD, Amount(requests=1), Caps(), baseline=CountingBaseline(Amount(requests=2)))
    await store.add_committed("t", PERIOD, Amount(training_tokens=1000))
    assert await store.snapshot("t", PERIOD) == (Amount(requests=2, training_tokens=1000), Amount(requests=1))


async def test_abandoned_holds_expire_and_keys_have_a_ttl(replicas: Replicas) -> None:
    store = replicas.store(hold_ttl_s=0.05)
    caps = Caps(max_requests=1)
    stale = await store.reserve("t", PERIOD, Amount(requests=1), caps, baseline=CountingBaseline())
    assert stale is not None
    assert await store.reserve("t", PERIOD, Amount(requests=1), caps, baseline=CountingBaseline()) is None
    await asyncio.sleep(0.1)
    assert await store.reserve("t", PERIOD, Amount(requests=1), caps, baseline=CountingBaseline()) is not None
    await store.settle("t", PERIOD, stale, Amount(requests=1))
    assert await store.snapshot("t", PERIOD) == (Amount(), Amount(requests=1))
    client = replicas.clients[0]
    for key in [k async for k in client.scan_iter(match=f"{replicas.prefix}quota:*")]:
        assert 39 * 86400 < await client.ttl(key) <= 40 * 86400


async def test_factory_builds_redis_backends(replicas: Replicas) -> None:
    limiter, quotas = make_limiters(REDIS_URL)
    tenant = f"{replicas.prefix}factory"
    try:
        assert isinstance(limiter, RedisRateLimiter)
        assert isinstance(quotas, RedisQuotaStore)
        assert (await limiter.check(tenant, rpm=1, tpm=1, tokens=1)).allowed
        assert await quotas.reserve(tenant, PERIOD, Amount(requests=1), Caps(), baseline=CountingBaseline())
    finally:
        await limiter.aclose()
        await quotas.aclose()
        quota_key = f"{KEY_PREFIX}{{{tenant}|{PERIOD}}}"
        await replicas.client().delete(f"mm:rl:{tenant}", quota_key, f"{quota_key}:holds", f"{quota_key}:deadlines")


# ---------------------------------------------------------------- one cost formula: Python and Lua agree

# Used totals stay below 1e8 and unit prices below 1e7 micro-cents, so every cost is below 2^53: Lua's doubles are
# exact there (USAGE_COST_LUA says so).
counts = st.integers(min_value=0, max_value=5 * 10**7)


@st.composite
def amounts(draw: st.DrawFn) -> Amount:
    """Random amounts, part of whose requests and tokens may be batch usage (priced at the plan's discount)."""
    requests, tokens = draw(counts), draw(counts)
    batch_requests, batch_tokens = draw(st.sampled_from([
        (0, 0), (requests, tokens), (draw(st.integers(0, requests)), draw(st.integers(0, tokens)))]))
    return Amount(requests, tokens, draw(counts), draw(st.integers(min_value=0, max_value=10**6)), batch_requests,
                  batch_tokens)


@st.composite
def flat_priced_plans(draw: st.DrawFn) -> Plan:
    """A plan with random allowances and random prices that are whole micro-cents per unit."""
    fields: dict[str, str | int] = {
        price.name: format(Decimal(draw(st.integers(0, 10**7)) * price.per_units).scaleb(-8), "f")
        for price in PRICES
    }
    for allowance in ("included_requests", "included_tokens", "included_training_tokens"):
        fields[allowance] = draw(st.integers(min_value=0, max_value=10**8))
    return Plan.model_validate({"id": "prop", "name": "Prop", "rpm_limit": 60, "tpm_limit": 60_000, **fields})


# Flat prices, or token and request tiers (graduated and volume, with flat amounts) spread over the counts' range.
priced_plans = with_batch_discount(st.one_of(
    flat_priced_plans(), tiered_plans(request_step=2 * 10**7, token_step=2 * 10**7, max_included=10**8)))


@pytest.fixture
def budget_store(replicas: Replicas) -> RedisQuotaStore:
    return replicas.store()  # one store for every example; each example uses its own tenant


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=priced_plans, committed=amounts(), amount=amounts())
async def test_lua_budget_cost_is_the_python_cost(
    budget_store: RedisQuotaStore, plan: Plan, committed: Amount, amount: Amount
) -> None:
    """The reserve script prices the totals with USAGE_COST_LUA exactly as pricing.metered_cost_micro does, flat
    prices and tiers alike: a budget of exactly the Python cost admits the reservation, one micro-cent less refuses
    it (in-process too)."""
    prices = metered_prices(plan)
    cost = metered_cost_micro(prices, (committed + amount).usage())
    tenant = uuid.uuid4().hex
    local = InProcessQuotaStore()

    async def baseline() -> Amount:
        return committed

    for budget, admitted in ((cost - 1, False), (cost, True)):
        caps = Caps(max_cost_micro=budget, prices=prices)
        assert (await budget_store.reserve(tenant, PERIOD, amount, caps, baseline=baseline) is not None) == admitted
        assert (await local.reserve(tenant, PERIOD, amount, caps, baseline=baseline) is not None) == admitted
