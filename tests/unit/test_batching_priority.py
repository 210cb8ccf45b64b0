"""Priorities in the batcher: interactive rows first, low (Batch API) rows in what is left of a batch, at most
``low_share`` of it, alone in batches of at most ``low_max_rows``; low requests hold permits of their own, leave
their queue when they depart and fail on close. Then the priority's way in: through the in-process engine, the
engine's socket (a negative one is interactive) and the gateway (a batch line is low, a request interactive).

The forward pass is a fake that records every batch and can be held (a threading.Event) so that requests queue up
behind it; the assertions are on what each batch carried, never on how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
import zmq.asyncio
from fastapi.testclient import TestClient

from modelmeter.gateway.batch_runner import BatchRunner
from modelmeter.gateway.services import services_of
from modelmeter.models.batching import Batcher, BatcherClosed, QueueFull
from modelmeter.models.batchqueue import Activity
from modelmeter.models.engine import protocol as p
from modelmeter.models.engine.client import RemoteEngine
from modelmeter.models.engine.core import EngineCore, EngineCounters
from modelmeter.models.engine.local import LocalEngine
from modelmeter.models.serving import AdapterConfig, BatchCaps, ModelServer
from modelmeter.models.source import ModelSource
from modelmeter.settings import Settings
from tests.conftest import ADMIN, bearer
from tests.support.batching import Model
from tests.tiny_bert import make_tiny_bert

pytestmark = pytest.mark.anyio


@pytest.fixture
def model() -> Iterator[Model]:
    fake = Model()
    yield fake
    fake.release()  # never leave the worker thread blocked


def make(model: Model, **options: Any) -> Batcher[Any]:
    settings: dict[str, Any] = {"max_batch_tokens": 10_000, "max_batch_size": 64, "max_wait_ms": 0.0,
                                "max_queue": 64, "max_padding_ratio": 100.0}
    return Batcher(model, **(settings | options))


def seq(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def blocked(batcher: Batcher[Any], model: Model) -> asyncio.Task[Any]:
    """A request whose forward pass is held: what is submitted next queues up behind it."""
    model.hold()
    blocker = asyncio.create_task(batcher.submit([seq(1, 9000)], tag="int-blocker"))
    await until(model.entered.is_set)
    return blocker


def low(batcher: Batcher[Any], rows: list[list[int]], name: str) -> asyncio.Task[Any]:
    return asyncio.create_task(batcher.submit(rows, tag=f"low-{name}", priority=1))


def interactive(batcher: Batcher[Any], rows: list[list[int]], name: str) -> asyncio.Task[Any]:
    return asyncio.create_task(batcher.submit(rows, tag=f"int-{name}"))


async def test_interactive_rows_go_before_older_low_rows(model: Model) -> None:
    async with make(model, max_batch_size=4) as batcher:
        blocker = await blocked(batcher, model)
        lows = [low(batcher, [seq(3, 100 * i)], f"{i}") for i in range(8)]  # queued first: older
        inters = [interactive(batcher, [seq(3, 5000 + 100 * i)], f"{i}") for i in range(8)]
        await until(lambda: batcher.queue_depth == 16)
        assert batcher.low_queue_depth == 8
        model.release()
        await asyncio.gather(blocker, *lows, *inters)
    kinds = model.kinds()[1:]
    # The older low rows wait: the first batch is all interactive (nothing earned yet); then each batch of four
    # keeps the one place its predecessor's interactive rows earned (0.2: one per four), until the interactive
    # rows are all served, in the first three batches.
    assert kinds[0] == ["int"] * 4
    assert [batch.count("low") for batch in kinds[1:3]] == [1, 1]
    assert sum(batch.count("int") for batch in kinds[:3]) == 8
    assert all(set(batch) == {"low"} for batch in kinds[3:])
    assert sum(batch.count("low") for batch in kinds) == 8


@pytest.mark.parametrize(("share", "joining"), [(0.0, 0), (0.25, 2), (0.5, 6), (1.0, 10)])
async def test_low_rows_fill_a_batch_up_to_their_share(model: Model, share: float, joining: int) -> None:
    async with make(model, low_share=share, low_max_rows=3) as batcher:
        blocker = await blocked(batcher, model)
        lows = [low(batcher, [seq(3, 100 * i)], f"{i}") for i in range(10)]
        inters = [interactive(batcher, [seq(3, 5000 + 100 * i)], f"{i}") for i in range(6)]
        await until(lambda: batcher.queue_depth == 16)
        model.release()
        await asyncio.gather(blocker, *lows, *inters)
    first, *rest = model.kinds()[1:]
    assert first.count("int") == 6  # every interactive row, in the first batch after the blocker
    assert first.count("low") == joining
    assert first.count("low") <= share * len(first)
    assert first[:6] == ["int"] * 6  # chosen first
    assert all(set(batch) == {"low"} and len(batch) <= 3 for batch in rest)
    assert sum(map(len, rest)) == 10 - joining


def test_the_share_bound_is_the_largest_count_within_the_share() -> None:
    for share in (0.0, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.75, 0.9, 1.0):
        for n in range(65):
            batcher: Batcher[Any] = Batcher(Model(), max_batch_tokens=10_000, max_batch_size=64, max_wait_ms=0,
                                            max_queue=4, low_share=share)
            room = batcher._low_room(n)  # a first batch: nothing earned before it
            assert 0 <= room <= 64 - n
            assert room <= share * (room + n) + 1e-9, (share, n, room)
            if room < 64 - n:  # not capped by the batch size: one more would pass the share
                assert room + 1 > share * (room + 1 + n) + 1e-9, (share, n, room)
    assert [Batcher(Model(), max_batch_tokens=1, max_batch_size=64, max_wait_ms=0, max_queue=1)._low_room(n)
            for n in (1, 2, 3, 4, 8)] == [0, 0, 0, 1, 2]  # the default share, 0.2


@pytest.mark.parametrize("share", [0.1, 0.2, 0.25, 1 / 3, 0.5])
def test_small_batches_earn_their_share_over_time_without_a_burst(share: float) -> None:
    """Batches of one to three interactive rows (each alone earning less than a low row's place) still let low
    rows take ``share`` of the rows over time, never more, and never more than one place beyond a batch's own."""
    batcher: Batcher[Any] = Batcher(Model(), max_batch_tokens=10_000, max_batch_size=64, max_wait_ms=0,
                                    max_queue=4, low_share=share)
    rng = random.Random(7)
    interactive = low = 0
    for turn in range(2000):
        n = rng.randint(1, 3)
        room = batcher._low_room(n)
        assert room <= math.floor(n * share / (1 - share)) + 1
        joined = room if turn % 5 else 0  # now and then no low row is waiting: what it earned is not hoarded
        batcher._spend_low(joined, waiting=bool(turn % 5))
        interactive, low = interactive + n, low + joined
        assert low <= share * (low + interactive) + 1
    assert low >= 0.8 * 0.8 * share * (low + interactive)  # four turns in five took all they could


async def test_low_rows_beside_interactive_ones_keep_the_token_cap_and_padding(model: Model) -> None:
    async with make(model, max_batch_tokens=24, max_padding_ratio=1.3, low_share=0.5) as batcher:
        blocker = await blocked(batcher, model)
        far = low(batcher, [seq(12, 100)], "far")  # oldest, but 4 x 12 tokens would pass the cap
        near = low(batcher, [seq(4, 200), seq(5, 300)], "near")
        inters = [interactive(batcher, [seq(4, 5000 + 100 * i)], f"{i}") for i in range(3)]
        await until(lambda: batcher.queue_depth == 6)
        model.release()
        await asyncio.gather(blocker, far, near, *inters)
    mixed = model.batches[1]
    assert sorted(map(len, mixed)) == [4, 4, 4, 4]  # the 4-token low row joined; neither 12 (cap) nor 5 (cap)
    assert model.kinds()[1] == ["int", "int", "int", "low"]
    assert seq(12, 100) not in mixed
    for batch in model.batches[1:]:
        assert len(batch) * max(map(len, batch)) <= 24 or len(batch) == 1


async def test_low_rows_alone_go_in_batches_of_at_most_low_max_rows(model: Model) -> None:
    async with make(model, low_max_rows=3) as batcher:
        blocker = await blocked(batcher, model)
        lows = [low(batcher, [seq(2, 100 * i), seq(2, 100 * i + 50)], f"{i}") for i in range(5)]
        await until(lambda: batcher.low_queue_depth == 10)
        model.release()
        await asyncio.gather(blocker, *lows)
    sizes = [len(batch) for batch in model.batches[1:]]
    assert sizes == [3, 3, 3, 1]


async def test_low_rows_are_served_at_once_when_nothing_interactive_waits(model: Model) -> None:
    # An hour of max_wait: were low rows waiting for a fuller batch, these would never come back.
    async with make(model, max_wait_ms=3_600_000, low_max_rows=2) as batcher:
        alone = await asyncio.wait_for(batcher.submit([seq(3), seq(3, 10), seq(3, 20)], priority=1), 5)
        assert alone.results == [tuple(seq(3)), tuple(seq(3, 10)), tuple(seq(3, 20))]
        model.hold()
        computing = low(batcher, [seq(2, 500)], "computing")
        await until(model.entered.is_set)
        queued = low(batcher, [seq(2, 600)], "queued")  # queued behind a busy worker: still not held back
        await until(lambda: batcher.low_queue_depth == 1)
        model.release()
        await asyncio.wait_for(asyncio.gather(computing, queued), 5)
    assert [len(batch) for batch in model.batches] == [2, 1, 1, 1]
    assert batcher.low_requests_in_flight == 0


async def test_a_low_backlog_holding_every_low_permit_never_refuses_an_interactive_request(model: Model) -> None:
    async with make(model, max_queue=2) as batcher:
        model.hold()
        lows = [low(batcher, [seq(2, 100 * i)], f"{i}") for i in range(2)]
        await until(model.entered.is_set)
        assert (batcher.low_requests_in_flight, batcher.requests_in_flight) == (2, 0)
        with pytest.raises(QueueFull, match="low"):
            await batcher.submit([seq(2)], priority=1)
        inters = [interactive(batcher, [seq(2, 5000 + 100 * i)], f"{i}") for i in range(2)]
        await until(lambda: batcher.requests_in_flight == 2)
        with pytest.raises(QueueFull, match="interactive"):  # interactive permits are their own too
            await batcher.submit([seq(2)])
        model.release()
        results = await asyncio.gather(*lows, *inters)
    assert [r.results for r in results] == [[tuple(seq(2, 100 * i))] for i in range(2)] + [
        [tuple(seq(2, 5000 + 100 * i))] for i in range(2)]
    assert (batcher.low_requests_in_flight, batcher.requests_in_flight) == (0, 0)


async def test_a_departed_low_request_leaves_the_queue_and_is_never_computed(model: Model) -> None:
    async with make(model) as batcher:
        blocker = await blocked(batcher, model)
        departed = low(batcher, [seq(3, 500), seq(4, 600)], "departed")
        staying = low(batcher, [seq(5, 700)], "staying")
        inter = interactive(batcher, [seq(2, 800)], "x")
        await until(lambda: batcher.queue_depth == 4)
        departed.cancel()
        await asyncio.sleep(0)
        assert (batcher.low_queue_depth, batcher.queue_depth, batcher.low_requests_in_flight) == (1, 2, 1)
        model.release()
        done = await asyncio.gather(blocker, staying, inter)
    assert departed.cancelled()
    computed = [row for batch in model.batches for row in batch]
    assert seq(3, 500) not in computed
    assert seq(4, 600) not in computed
    assert done[1].results == [tuple(seq(5, 700))]
    assert done[2].results == [tuple(seq(2, 800))]


async def test_a_departed_low_request_being_computed_returns_after_its_forward_pass(model: Model) -> None:
    async with make(model) as batcher:
        model.hold()
        computing = low(batcher, [seq(3)], "adapter")
        await until(model.entered.is_set)
        computing.cancel()
        await asyncio.sleep(0.05)
        assert not computing.done()  # its row is still being read by the forward pass
        model.release()
        with pytest.raises(asyncio.CancelledError):
            await computing


async def test_close_fails_both_queues(model: Model) -> None:
    batcher = make(model)
    blocker = await blocked(batcher, model)
    queued_low = low(batcher, [seq(3)], "q")
    queued_inter = interactive(batcher, [seq(4)], "q")
    await until(lambda: batcher.queue_depth == 2)
    await batcher.close()
    model.release()
    for task in (blocker, queued_low, queued_inter):
        with pytest.raises(BatcherClosed):
            await asyncio.wait_for(task, 5)  # a queue left unfailed would leave its requests waiting forever
    assert batcher.queue_depth == 0
    with pytest.raises(BatcherClosed):
        await batcher.submit([seq(1)], priority=1)


async def test_every_request_gets_its_own_results_in_input_order_across_mixed_batches(model: Model) -> None:
    async with make(model, max_batch_size=5, low_share=0.5, low_max_rows=2) as batcher:
        blocker = await blocked(batcher, model)
        requests: list[tuple[list[list[int]], asyncio.Task[Any]]] = []
        for i in range(6):
            rows = [seq(2 + (i + j) % 3, 1000 * i + 100 * j) for j in range(1 + i % 3)]
            requests.append((rows, (low if i % 2 else interactive)(batcher, rows, f"{i}")))
        await until(lambda: batcher.queue_depth == sum(len(rows) for rows, _ in requests))
        model.release()
        await blocker
        for rows, task in requests:
            assert (await task).results == [tuple(row) for row in rows]
    for batch, tags in zip(model.batches, model.tags, strict=True):
        for row, tag in zip(batch, tags, strict=True):  # each row went with its own request's tag
            assert tag == "int-blocker" or tag.endswith(f"-{row[0] // 1000}")


async def test_a_negative_priority_and_bad_knobs_are_refused(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    async with make(model) as batcher:
        with pytest.raises(ValueError, match="priority"):
            await batcher.submit([seq(2)], priority=-1)
        assert batcher.requests_in_flight == batcher.low_requests_in_flight == 0
    for bad in ({"low_share": 1.5}, {"low_share": -0.1}, {"low_share": float("nan")}, {"low_max_rows": 0}):
        with pytest.raises(ValueError, match="low_share"):
            make(model, **bad)
    defaults = Settings(_env_file=None)
    assert (defaults.batch_share, defaults.batch_max_rows, defaults.batch_idle_ms) == (0.2, 8, 20.0)
    monkeypatch.setenv("MODELMETER_BATCH_SHARE", "0.5")
    monkeypatch.setenv("MODELMETER_BATCH_MAX_ROWS", "4")
    configured = Settings(_env_file=None)
    assert (configured.batch_share, configured.batch_max_rows) == (0.5, 4)
    for name, value in (("MODELMETER_BATCH_SHARE", "1.5"), ("MODELMETER_BATCH_MAX_ROWS", "0")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ValueError, match="batch_"):
                Settings(_env_file=None)


# --- the priority's way in -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    path = make_tiny_bert(tmp_path_factory.mktemp("models") / "base", "feature-extraction")
    return ModelSource("tiny-base", path, "feature-extraction")


@pytest.fixture
def priorities(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every priority a batcher is submitted at, in order."""
    seen: list[int] = []
    submit = Batcher.submit

    async def spy(self: Batcher[Any], ids: list[list[int]], tag: Any = None, *, origin: object = None,
                  priority: int = 0) -> Any:
        seen.append(priority)
        return await submit(self, ids, tag, origin=origin, priority=priority)

    monkeypatch.setattr(Batcher, "submit", spy)
    return seen


def server(counters: EngineCounters) -> ModelServer:
    return ModelServer(device=torch.device("cpu"), memory_budget_bytes=1 << 30,
                       caps=BatchCaps(max_batch_tokens=4096, max_batch_size=16, max_wait_ms=1.0, max_queue=16,
                                      low_share=0.5, low_max_rows=3),
                       adapters=AdapterConfig(budget_bytes=1 << 26, max_labels=8),
                       on_batch=lambda _: counters.wrap(None), on_origins=counters.on_origins)


@pytest.mark.usefixtures("one_torch_thread")
async def test_the_in_process_engine_passes_the_priority(base_model: ModelSource, priorities: list[int]) -> None:
    engine = LocalEngine(server(counters := EngineCounters()), counters)
    try:
        await engine.submit(base_model, [[101, 102]])
        await engine.submit(base_model, [[101, 7, 102], [101, 102]], priority=1)
        await engine.submit(base_model, [[101, 102]], priority=-4)  # nothing is sooner than interactive
        async with engine.server.use(base_model) as lease:
            assert (lease.batcher.low_share, lease.batcher.low_max_rows) == (0.5, 3)  # the caps reach the batcher
        _, [stats] = await engine.stats()
    finally:
        await engine.aclose()
    assert priorities == [0, 1, 0]
    assert (stats.rows, stats.low_rows) == (4, 2)


@pytest.fixture
async def remote(tmp_path: Path) -> AsyncIterator[tuple[EngineCore, RemoteEngine]]:
    counters = EngineCounters()
    core = EngineCore(server(counters), counters, path=tmp_path / "run" / "e.sock", simulated=False)
    task = asyncio.get_running_loop().create_task(core.run())
    client = RemoteEngine([core.path], ping_s=0.05, hang_s=2.0)
    await client.start()
    try:
        assert await client.wait_ready(10)
        yield core, client
    finally:
        await client.aclose()
        core.stop()
        await task
        await core.server.close()


@pytest.mark.usefixtures("one_torch_thread")
async def test_the_engine_socket_passes_the_priority(remote: tuple[EngineCore, RemoteEngine],
                                                     base_model: ModelSource, priorities: list[int]) -> None:
    core, client = remote
    await client.submit(base_model, [[101, 102]])
    await client.submit(base_model, [[101, 7, 102], [101, 102], [101, 8, 102]], priority=1)
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(f"ipc://{core.path}")
    try:  # a negative priority off the wire is served, as interactive
        await raw.send(p.to_engine_encoder.encode(p.Infer(7, p.wire(base_model), *p.pack_ids([[101, 102]]), -3)))
        reply = p.to_front_decoder.decode(await asyncio.wait_for(raw.recv(), 5))
    finally:
        raw.close(linger=0)
        ctx.term()
    assert isinstance(reply, p.Done)
    assert priorities == [0, 1, 0]
    _, [stats] = await client.stats()
    assert (stats.rows, stats.low_rows) == (5, 3)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No runner in the background: the test drives one on the app's event loop."""
    return settings.model_copy(update={"batch_interval_s": 0})


def test_a_batch_line_is_low_priority_and_a_request_interactive(
        client: TestClient, make_tenant: Any, make_key: Any, register_model: Any, priorities: list[int]) -> None:
    tenant_id = make_tenant()["id"]
    headers = bearer(make_key(tenant_id)["key"])
    model = register_model(tenant_id)
    body = {"model": model, "input": "a support ticket, please help"}
    assert client.post("/v1/classify", json=body, headers=headers).status_code == 200
    lines = b"".join(json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/classify",
                                 "body": body}).encode() + b"\n" for i in range(3))
    uploaded = client.post("/v1/files", files={"file": ("b.jsonl", lines)}, data={"purpose": "batch"},
                           headers=headers)
    assert uploaded.status_code == 200, uploaded.text
    created = client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/classify",
                                               "completion_window": "24h"}, headers=headers)
    assert created.status_code == 200, created.text
    runner = BatchRunner(client.app, services_of(client.app))
    client.portal.call(runner.run_once)  # type: ignore[union-attr]  # the app's own event loop
    done = client.get(f"/v1/batches/{created.json()['id']}", headers=headers).json()
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert priorities == [0, 1, 1, 1]
    engine = client.get("/admin/engine", headers=ADMIN).json()["engines"][0]
    assert engine["low_rows"] == 3


async def test_low_rows_alone_wait_until_interactive_traffic_has_paused(model: Model) -> None:
    """Right after an interactive batch its clients are about to send again: low rows alone wait ``low_idle_ms``
    and an interactive request arriving in that pause goes first, though the worker was free and the low rows
    older. With no pause asked for, the low rows go at once."""
    for idle_ms, expected in ((300.0, [["int"], ["int"], ["low"]]), (0.0, [["int"], ["low"], ["int"]])):
        model.batches.clear()
        model.tags.clear()
        async with make(model, low_idle_ms=idle_ms) as batcher:
            await interactive(batcher, [seq(2)], "first")
            waiting = low(batcher, [seq(2, 100)], "batch")
            await asyncio.sleep(0.05)  # well inside the 300 ms pause, long after a free worker would start
            await interactive(batcher, [seq(2, 200)], "second")
            await asyncio.wait_for(waiting, 5)
        assert model.kinds() == expected, idle_ms


async def test_interactive_batches_that_fill_up_still_leave_low_rows_their_places(model: Model) -> None:
    """Interactive rows enough to fill every batch: the places low rows earned are kept out of the next batches'
    interactive rows, so low rows get their share instead of waiting for a pause that never comes."""
    async with make(model, max_batch_size=8, low_share=0.2, low_idle_ms=10_000.0) as batcher:
        blocker = await blocked(batcher, model)
        inters = [interactive(batcher, [seq(2, 1000 + 10 * i)], f"{i}") for i in range(40)]
        lows = [low(batcher, [seq(2, 100 * i)], f"{i}") for i in range(4)]
        await until(lambda: batcher.queue_depth == 44)
        model.release()
        await asyncio.wait_for(asyncio.gather(blocker, *inters, *lows), 5)
    kinds = model.kinds()[1:]
    assert all(len(batch) <= 8 for batch in kinds)
    first_low = next(i for i, batch in enumerate(kinds) if "low" in batch)
    assert first_low <= 2  # earned within the first batches of 8 interactive rows, not after all 40
    served = [kind for batch in kinds[: first_low + 4] for kind in batch]
    assert served.count("low") <= 0.2 * len(served) + 1  # and no more than their share


async def test_low_rows_wait_for_another_models_interactive_requests_on_the_same_device() -> None:
    """Models on one device share its forward thread: a model's low rows alone wait while another model's
    interactive request is in flight (they would otherwise take turns with its batches on the thread)."""
    shared = Activity()
    batch_model, busy_model = Model(), Model()
    try:
        async with make(batch_model, low_idle_ms=50.0, activity=shared) as quiet, \
                make(busy_model, activity=shared) as busy:
            busy_model.hold()
            held = interactive(busy, [seq(2)], "other-model")
            await until(busy_model.entered.is_set)
            waiting = low(quiet, [seq(2, 100)], "batch")
            await asyncio.sleep(0.3)  # six pauses' worth: an unshared batcher would have gone long ago
            assert batch_model.batches == []
            busy_model.release()
            await asyncio.wait_for(asyncio.gather(held, waiting), 5)
        assert batch_model.kinds() == [["low"]]
    finally:
        batch_model.release()
        busy_model.release()
