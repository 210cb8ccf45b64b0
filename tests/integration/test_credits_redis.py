"""Credit draws inside the quota reservation on a real Redis: the Lua draw is the Python rule (``plan_draws``),
the in-process store agrees step by step, and holds return or keep their draws as they are released, expire or
settle."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelmeter.billing.drawdown import CreditTerms, GrantBalance, draw_rank, plan_draws
from modelmeter.billing.pricing import MeteredPrice, MeteredPrices
from modelmeter.billing.quota import Amount, Caps, InProcessQuotaStore, QuotaStore
from modelmeter.billing.tiers import PriceTier
from tests.integration.test_limits_redis import REDIS_URL, Replicas, replicas  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    pytest.mark.skipif(not REDIS_URL, reason="needs a Redis: set MODELMETER_REDIS_URL (CI does)"),
]

PERIOD = "2026-11"
NOW = 1_793_491_200


async def no_baseline() -> Amount:
    return Amount()


def terms(grants: list[GrantBalance], *, epoch: int = 1, now: int = NOW, prepaid: bool = True,
          drawn: int = 0) -> CreditTerms:
    async def load() -> list[GrantBalance]:
        return [GrantBalance(g.id, g.rank, g.expires_at, g.remaining_micro) for g in grants]

    async def period_drawn() -> int:
        return drawn

    return CreditTerms(epoch=epoch, now=now, prepaid=prepaid, load=load, drawn=period_drawn)


def balance(gid: str, micro: int, *, source: str = "granted", expires_at: int | None = None,
            created: int = NOW - 100) -> GrantBalance:
    return GrantBalance(gid, draw_rank(source=source, expires_at=expires_at, created=created, grant_id=gid),
                        expires_at, micro)


grant_lists = st.lists(
    st.builds(
        balance,
        gid=st.uuids().map(lambda u: f"cg_{u.hex[:10]}"),
        micro=st.integers(0, 10**12),
        source=st.sampled_from(["granted", "purchased"]),
        expires_at=st.none() | st.integers(NOW - 10, NOW + 10),
        created=st.integers(NOW - 1000, NOW),
    ),
    max_size=5, unique_by=lambda g: g.id,
)


@pytest.fixture
def store(replicas: Replicas) -> QuotaStore:  # noqa: F811
    return replicas.store()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grants=grant_lists, costs=st.lists(st.integers(0, 4 * 10**11), min_size=1, max_size=8), prepaid=st.booleans())
async def test_lua_draws_are_the_python_rule(store: QuotaStore, grants: list[GrantBalance], costs: list[int],
                                             prepaid: bool) -> None:
    """Step by step, Redis and the in-process store admit the same requests and draw the same grants, exactly as
    ``plan_draws`` says from the balances a model of the grants keeps."""
    tenant = uuid.uuid4().hex
    local = InProcessQuotaStore()
    model = {g.id: g.remaining_micro for g in grants}
    for cost in costs:
        credit = terms(grants, prepaid=prepaid)
        current = [GrantBalance(g.id, g.rank, g.expires_at, model[g.id]) for g in grants]
        expected = plan_draws(current, cost, now=NOW, prepaid=prepaid)
        outcomes = [await s.reserve_drawing(tenant, PERIOD, Amount(cost_micro=cost), Caps(), baseline=no_baseline,
                                            credits=credit) for s in (store, local)]
        for outcome in outcomes:
            assert (outcome is None) == (expected is None)
            if outcome is not None:
                assert outcome.draws == expected
        for grant_id, micro in expected or ():
            model[grant_id] -= micro
    live = {g.id: model[g.id] for g in grants}
    assert await store.credit_balances(tenant) == live
    assert await local.credit_balances(tenant) == live


@pytest.mark.parametrize("kind", ["redis", "local"])
async def test_release_returns_draws_and_settle_keeps_them(replicas: Replicas, kind: str) -> None:  # noqa: F811
    store: QuotaStore = replicas.store() if kind == "redis" else InProcessQuotaStore()
    tenant, grants = uuid.uuid4().hex, [balance("cg_a", 300)]
    first = await store.reserve_drawing(tenant, PERIOD, Amount(cost_micro=200), Caps(), baseline=no_baseline,
                                        credits=terms(grants))
    assert first is not None
    assert first.draws == (("cg_a", 200),)
    refused = await store.reserve_drawing(tenant, PERIOD, Amount(cost_micro=200), Caps(), baseline=no_baseline,
                                          credits=terms(grants))
    assert refused is None  # 100 left: a prepaid request of 200 is refused, and draws nothing
    assert await store.credit_balances(tenant) == {"cg_a": 100}
    await store.release(tenant, PERIOD, first.id)
    await store.release(tenant, PERIOD, first.id)  # a second release returns nothing more
    assert await store.credit_balances(tenant) == {"cg_a": 300}
    second = await store.reserve_drawing(tenant, PERIOD, Amount(cost_micro=250), Caps(), baseline=no_baseline,
                                         credits=terms(grants))
    assert second is not None
    await store.settle(tenant, PERIOD, second.id, Amount(cost_micro=250))
    await store.release(tenant, PERIOD, second.id)  # too late: settled draws stay drawn
    assert await store.credit_balances(tenant) == {"cg_a": 50}


@pytest.mark.parametrize("kind", ["redis", "local"])
async def test_expired_holds_park_their_draws_until_the_ledger_says(replicas: Replicas, kind: str) -> None:  # noqa: F811
    """A hold that lapses unsettled (its replica died, or the settle failed) neither refunds nor keeps its draw
    blindly: the draw is parked, out of the balance, until the ledger says whether the request was served (its
    usage row exists: keep it) or not (return it). Credits are never drawn twice, nor lost."""
    clock = [1000.0]
    store: QuotaStore = (replicas.store(hold_ttl_s=0.05) if kind == "redis"
                         else InProcessQuotaStore(hold_ttl_s=0.05, clock=lambda: clock[0]))
    tenant, grants = uuid.uuid4().hex, [balance("cg_a", 300)]
    for request_id in ("req_served", "req_lost"):
        held = await store.reserve_drawing(tenant, PERIOD, Amount(cost_micro=100), Caps(), baseline=no_baseline,
                                           credits=terms(grants), reservation_id=request_id)
        assert held is not None
        assert held.id == request_id
    await asyncio.sleep(0.1)
    clock[0] += 1
    # The next reservation reaps both: their 200 stay out of the balance, so only 100 is left to draw.
    assert await store.reserve_drawing(tenant, PERIOD, Amount(cost_micro=150), Caps(), baseline=no_baseline,
                                       credits=terms(grants)) is None
    assert await store.credit_balances(tenant) == {"cg_a": 100}
    assert await store.expired_draws(tenant) == {"req_served": (("cg_a", 100),), "req_lost": (("cg_a", 100),)}
    await store.resolve_expired(tenant, {"req_served": True, "req_lost": False})
    await store.resolve_expired(tenant, {"req_lost": False})  # resolving twice returns nothing more
    assert await store.expired_draws(tenant) == {}
    assert await store.credit_balances(tenant) == {"cg_a": 200}


@pytest.mark.parametrize("kind", ["redis", "local"])
async def test_a_newer_epoch_adds_new_grants_and_keeps_held_balances(replicas: Replicas, kind: str) -> None:  # noqa: F811
    store: QuotaStore = replicas.store() if kind == "redis" else InProcessQuotaStore()
    tenant = uuid.uuid4().hex
    first = [balance("cg_a", 100)]
    assert await store.reserve_drawing(tenant, PERIOD, Amount(cost_micro=60), Caps(), baseline=no_baseline,
                                       credits=terms(first, epoch=1))
    # The ledger has not seen the draw yet (the row is in flight): it still says 100 for cg_a. The store must keep
    # its own 40 and only add cg_b.
    second = [balance("cg_a", 100), balance("cg_b", 500)]
    assert await store.reserve_drawing(tenant, PERIOD, Amount(cost_micro=0), Caps(), baseline=no_baseline,
                                       credits=terms(second, epoch=2))
    assert await store.credit_balances(tenant) == {"cg_a": 40, "cg_b": 500}


async def test_replicas_loading_grants_together_draw_once(replicas: Replicas) -> None:  # noqa: F811
    stores = [replicas.store(), replicas.store()]
    tenant, grants = uuid.uuid4().hex, [balance("cg_a", 1000)]
    outcomes = await asyncio.gather(*(
        stores[i % 2].reserve_drawing(tenant, PERIOD, Amount(cost_micro=30), Caps(), baseline=no_baseline,
                                      credits=terms(grants)) for i in range(50)))
    assert sum(o is not None for o in outcomes) == 33
    assert await stores[0].credit_balances(tenant) == {"cg_a": 10}


# Requests priced in volume tiers: 10 micro-cents each up to 100 billable requests, 5 each (all of them) beyond.
VOLUME = Caps(prices=MeteredPrices(
    requests=MeteredPrice(0, tiers=(PriceTier(100, 10), PriceTier(None, 5)), mode="volume"),
    tokens=MeteredPrice(0), training_tokens=MeteredPrice(0)))


async def served(store: QuotaStore, tenant: str, count: int, grants: list[GrantBalance], **kw: int) -> int:
    """Reserve and settle ``count`` requests of one unit each; what they drew in all."""
    drawn = 0
    for _ in range(count):
        held = await store.reserve_drawing(tenant, PERIOD, Amount(requests=1), VOLUME, baseline=no_baseline,
                                           credits=terms(grants, **kw))
        assert held is not None
        drawn += held.drawn_micro
        await store.settle(tenant, PERIOD, held.id, Amount(requests=1))
    return drawn


@pytest.mark.parametrize("kind", ["redis", "local"])
async def test_volume_tiers_never_draw_past_the_periods_cost(replicas: Replicas, kind: str) -> None:  # noqa: F811
    """drawdown's worked example: at the margin, requests 1..100 draw 10 each; request 101 reprices the period to
    505 and draws nothing, and so do 102..200 (the cost catches up with the 1000 drawn); 201 draws 5. Without the
    period's drawn total, 102..201 would have drawn 5 each: 500 more than the period charges."""
    store: QuotaStore = replicas.store() if kind == "redis" else InProcessQuotaStore()
    tenant, grants = uuid.uuid4().hex, [balance("cg_a", 10_000)]
    assert await served(store, tenant, 100, grants) == 1000
    assert await served(store, tenant, 100, grants) == 0
    assert await served(store, tenant, 1, grants) == 5
    assert await store.credit_balances(tenant) == {"cg_a": 10_000 - 1005}
    assert VOLUME.cost_of(Amount(requests=201)) == 1005


@pytest.mark.parametrize("kind", ["redis", "local"])
async def test_the_drawn_total_starts_from_the_ledger_and_a_release_takes_its_draw_off(
        replicas: Replicas, kind: str) -> None:  # noqa: F811
    """Counters that start after a restart (or an empty Redis) take the period's draws from the ledger: 150
    requests served, 1000 drawn, so the 151st draws nothing. A released hold's draw leaves the drawn total with
    it, so the next request draws it again."""
    store: QuotaStore = replicas.store() if kind == "redis" else InProcessQuotaStore()
    tenant, grants = uuid.uuid4().hex, [balance("cg_a", 10_000)]

    async def ledger() -> Amount:
        return Amount(requests=150)

    held = await store.reserve_drawing(tenant, PERIOD, Amount(requests=1), VOLUME, baseline=ledger,
                                       credits=terms(grants, drawn=1000))
    assert held is not None
    assert held.draws == ()
    await store.settle(tenant, PERIOD, held.id, Amount(requests=1))
    assert await served(store, tenant, 49, grants) == 0  # 200 requests: 1000, all drawn already
    first = await store.reserve_drawing(tenant, PERIOD, Amount(requests=1), VOLUME, baseline=ledger,
                                        credits=terms(grants))
    assert first is not None
    assert first.draws == (("cg_a", 5),)
    await store.release(tenant, PERIOD, first.id)
    again = await store.reserve_drawing(tenant, PERIOD, Amount(requests=1), VOLUME, baseline=ledger,
                                        credits=terms(grants))
    assert again is not None
    assert again.draws == (("cg_a", 5),)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(1, 150), st.booleans()), min_size=1, max_size=12),
       micro=st.integers(0, 5000))
async def test_lua_drawn_total_is_the_python_rule(store: QuotaStore, steps: list[tuple[int, bool]],
                                                  micro: int) -> None:
    """Across volume-tier reprices, settles and releases, Redis and the in-process store draw the same amounts,
    and after every draw the period's draws are within the period's cost (``drawdown.due_micro``)."""
    tenant, grants = uuid.uuid4().hex, [balance("cg_a", micro)]
    local = InProcessQuotaStore()
    counted, drawn = 0, 0  # requests held or settled, and their draws, per the model
    for requests, keep in steps:
        outcomes = [await s.reserve_drawing(tenant, PERIOD, Amount(requests=requests), VOLUME,
                                            baseline=no_baseline, credits=terms(grants, prepaid=False))
                    for s in (store, local)]
        assert outcomes[0] is not None
        assert outcomes[1] is not None
        assert outcomes[0].draws == outcomes[1].draws
        if outcomes[0].draws:
            assert drawn + outcomes[0].drawn_micro <= VOLUME.cost_of(Amount(requests=counted + requests))
        for s, held in zip((store, local), outcomes, strict=True):
            if keep:
                await s.settle(tenant, PERIOD, held.id, Amount(requests=requests))
            else:
                await s.release(tenant, PERIOD, held.id)
        if keep:
            counted, drawn = counted + requests, drawn + outcomes[0].drawn_micro
    assert await store.credit_balances(tenant) == await local.credit_balances(tenant) == {"cg_a": micro - drawn}
