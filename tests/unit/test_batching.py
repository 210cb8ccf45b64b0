"""The batcher: order, batch formation under caps, permits, departed clients, failures, close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from modelmeter.models.backends import BertBackend
from modelmeter.models.batching import Batcher, BatcherClosed, QueueFull
from tests.support.batching import POISON, Model
from tests.tiny_bert import make_tiny_bert

pytestmark = pytest.mark.anyio

@dataclass
class BatchLog:
    calls: list[tuple[int, int, int, float, float]] = field(default_factory=list)

    def __call__(self, size: int, real: int, padded: int, queue_s: float, compute_s: float) -> None:
        self.calls.append((size, real, padded, queue_s, compute_s))


@pytest.fixture
def model() -> Iterator[Model]:
    fake = Model()
    yield fake
    fake.release()  # never leave the worker thread blocked


def make(model: Callable[[list[list[int]], list[Any]], list[Any]], **options: Any) -> Batcher[Any]:
    settings: dict[str, Any] = {"max_batch_tokens": 10_000, "max_batch_size": 64, "max_wait_ms": 0.0}
    settings |= {"max_queue": 64} | options
    return Batcher(model, **settings)


def seq(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def test_results_come_back_in_input_order(model: Model) -> None:
    inputs = [seq(5, 100), seq(1, 200), seq(9, 300), seq(3, 400)]
    async with make(model, max_batch_size=2, max_padding_ratio=100) as batcher:
        submission = await batcher.submit(inputs)
    assert submission.results == [tuple(row) for row in inputs]
    assert len(model.batches) == 2
    assert submission.queue_s >= 0
    assert submission.inference_s >= 0


async def test_an_empty_request_is_answered_at_once(model: Model) -> None:
    async with make(model) as batcher:
        submission = await batcher.submit([])
    assert (submission.results, model.batches) == ([], [])


async def test_a_lone_request_does_not_wait_for_a_batch_to_fill(model: Model) -> None:
    async with make(model, max_wait_ms=500) as batcher:
        await batcher.submit([seq(4)])  # warm the worker thread
        started = time.perf_counter()
        submission = await batcher.submit([seq(4)])
        elapsed = time.perf_counter() - started
    assert elapsed < 0.1
    assert submission.queue_s < 0.05


async def test_concurrent_requests_form_batches(model: Model) -> None:
    log = BatchLog()
    model.delay_s = 0.005
    async with make(model, on_batch=log, max_wait_ms=2) as batcher:
        requests = [[seq(1 + i % 7, 1000 * i)] for i in range(32)]
        submissions = await asyncio.gather(*(batcher.submit(r) for r in requests))
    assert [s.results for s in submissions] == [[tuple(r[0])] for r in requests]
    sizes = [size for size, *_ in log.calls]
    assert sum(sizes) == 32
    assert max(sizes) > 1
    assert len(sizes) < 32
    for size, real, padded, queue_s, compute_s in log.calls:
        assert size <= real <= padded
        assert queue_s >= 0
        assert compute_s >= model.delay_s


async def test_batches_respect_size_and_token_caps(model: Model) -> None:
    log = BatchLog()
    model.hold()
    async with make(model, on_batch=log, max_batch_size=4, max_batch_tokens=24) as batcher:
        first = asyncio.create_task(batcher.submit([seq(2)]))
        await until(model.entered.is_set)
        lengths = [1, 8, 3, 5, 2, 7, 6, 4, 1, 2, 8, 3, 30]
        requests = [asyncio.create_task(batcher.submit([seq(n, 100 * i)])) for i, n in enumerate(lengths)]
        await until(lambda: batcher.queue_depth == len(lengths))
        model.release()
        await asyncio.gather(first, *requests)
    for size, _, padded, _, _ in log.calls:
        assert size <= 4
        assert padded <= 24 or size == 1  # an input over the token cap still runs, alone
    assert (1, 30, 30) in [call[:3] for call in log.calls]
    assert sorted(len(row) for row in model.computed()) == sorted([2, *lengths])


async def test_inputs_of_similar_length_are_grouped(model: Model) -> None:
    model.hold()
    async with make(model, max_batch_size=2) as batcher:
        first = asyncio.create_task(batcher.submit([seq(1)]))
        await until(model.entered.is_set)
        mixed = asyncio.create_task(batcher.submit([seq(2), seq(50), seq(3), seq(51)]))
        await until(lambda: batcher.queue_depth == 4)
        model.release()
        await asyncio.gather(first, mixed)
    assert [sorted(len(row) for row in batch) for batch in model.batches[1:]] == [[2, 3], [50, 51]]
    assert mixed.result().results == [tuple(seq(2)), tuple(seq(50)), tuple(seq(3)), tuple(seq(51))]


async def test_padding_is_bounded_even_when_the_size_cap_allows_more(model: Model) -> None:
    model.hold()
    async with make(model, max_batch_size=64, max_padding_ratio=1.3) as batcher:
        first = asyncio.create_task(batcher.submit([seq(1)]))
        await until(model.entered.is_set)
        lengths = [4, 40, 5, 41, 4, 42, 5, 43, 20, 21]
        mixed = asyncio.create_task(batcher.submit([seq(n) for n in lengths]))
        await until(lambda: batcher.queue_depth == len(lengths))
        model.release()
        await asyncio.gather(first, mixed)
    for batch in model.batches[1:]:
        widths = [len(row) for row in batch]
        assert len(batch) * max(widths) <= 1.3 * sum(widths), widths
        assert not (min(widths) <= 5 and max(widths) >= 40)  # short inputs never pay for long ones
    assert len(model.batches) >= 3  # the ten inputs did not go as one batch of 43-token rows
    assert mixed.result().results == [tuple(seq(n)) for n in lengths]


async def test_queue_full_when_no_permit_is_free(model: Model) -> None:
    model.hold()
    async with make(model, max_queue=2) as batcher:
        held = [asyncio.create_task(batcher.submit([seq(3)])) for _ in range(2)]
        await until(model.entered.is_set)
        assert batcher.requests_in_flight == 2
        with pytest.raises(QueueFull):
            await batcher.submit([seq(3)])
        model.release()
        await asyncio.gather(*held)
        assert batcher.requests_in_flight == 0
        assert (await batcher.submit([seq(3)])).results == [tuple(seq(3))]


async def test_departed_clients_are_not_computed(model: Model) -> None:
    model.hold()
    async with make(model) as batcher:
        first = asyncio.create_task(batcher.submit([seq(2)]))
        await until(model.entered.is_set)
        departed = asyncio.create_task(batcher.submit([seq(3, 500), seq(4, 600)]))
        staying = asyncio.create_task(batcher.submit([seq(5, 700)]))
        await until(lambda: batcher.queue_depth == 3)
        departed.cancel()
        await asyncio.sleep(0)
        assert (batcher.queue_depth, batcher.requests_in_flight) == (1, 2)
        model.release()
        await asyncio.gather(first, staying)
    assert departed.cancelled()
    assert [600, 601, 602, 603] not in model.computed()
    assert [500, 501, 502] not in model.computed()
    assert staying.result().results == [tuple(seq(5, 700))]


async def test_a_failing_batch_fails_only_its_own_requests(model: Model) -> None:
    model.hold()
    async with make(model) as batcher:
        first = asyncio.create_task(batcher.submit([seq(2)]))
        await until(model.entered.is_set)
        poisoned = asyncio.create_task(batcher.submit([[POISON, 1]]))
        neighbour = asyncio.create_task(batcher.submit([seq(2, 10)]))
        await until(lambda: batcher.queue_depth == 2)
        model.release()
        outcomes = await asyncio.gather(first, poisoned, neighbour, return_exceptions=True)
        later = await batcher.submit([seq(3, 20)])
    assert outcomes[0].results == [tuple(seq(2))]  # type: ignore[union-attr]
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[1] is outcomes[2]
    assert later.results == [tuple(seq(3, 20))]


async def test_a_request_split_across_batches_fails_as_a_whole(model: Model) -> None:
    async with make(model, max_batch_size=1) as batcher:
        with pytest.raises(ValueError, match="poisoned"):
            await batcher.submit([seq(2), [POISON], seq(2, 5), seq(2, 9)])
        assert batcher.queue_depth == 0
    assert [5, 6] not in model.computed()
    assert [9, 10] not in model.computed()


async def test_close_fails_queued_requests_and_refuses_new_ones(model: Model) -> None:
    model.hold()
    batcher = make(model)
    computing = asyncio.create_task(batcher.submit([seq(2)]))
    await until(model.entered.is_set)
    queued = asyncio.create_task(batcher.submit([seq(3)]))
    await until(lambda: batcher.queue_depth == 1)
    await batcher.close()
    model.release()
    for task in (computing, queued):
        with pytest.raises(BatcherClosed):
            await task
    with pytest.raises(BatcherClosed):
        await batcher.submit([seq(1)])


async def test_a_failing_telemetry_hook_does_not_break_serving(model: Model) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("telemetry down")

    async with make(model, on_batch=broken) as batcher:
        assert (await batcher.submit([seq(2)])).results == [(0, 1)]
        assert (await batcher.submit([seq(1)])).results == [(0,)]


def test_caps_must_be_positive(model: Model) -> None:
    with pytest.raises(ValueError, match="caps must be positive"):
        make(model, max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms non-negative"):
        make(model, max_wait_ms=-1)



@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
async def test_batching_a_real_backend_changes_nothing(task: str, tmp_path: Path) -> None:
    backend = BertBackend.load(make_tiny_bert(tmp_path, task), task=task, device=torch.device("cpu"))  # type: ignore[arg-type]
    texts = ["short", "a somewhat longer input sentence", "mid length text here", "x " * 200, "ok"]
    rows = backend.tokenize(texts, truncate=False).ids
    alone = [backend.forward([row])[0] for row in rows]
    log = BatchLog()
    async with Batcher(
        backend.forward, max_batch_tokens=4096, max_batch_size=8, max_wait_ms=5, max_queue=16, on_batch=log
    ) as batcher:
        submissions = await asyncio.gather(*(batcher.submit([row]) for row in rows))
    assert max(size for size, *_ in log.calls) > 1
    for single, submission in zip(alone, submissions, strict=True):
        batched = submission.results[0]
        flat = list(batched.values()) if isinstance(batched, dict) else batched
        expected = list(single.values()) if isinstance(single, dict) else single
        assert flat == pytest.approx(expected, abs=1e-5)


async def test_tags_reach_the_forward_pass_and_compute_is_shared_by_tokens(model: Model) -> None:
    """Requests of different tags (tenants' adapters) in one batch: each row arrives with its own request's tag,
    and each request is attributed its tokens' share of the batch's forward time, the shares summing to it."""
    log = BatchLog()
    model.delay_s = 0.01
    async with make(model, on_batch=log, max_padding_ratio=100) as batcher:
        model.hold()
        blocker = asyncio.create_task(batcher.submit([seq(1)], tag="warm"))
        await asyncio.to_thread(model.entered.wait, 5)
        waiting = [asyncio.create_task(batcher.submit([seq(n, 10 * n)], tag=f"t{n}")) for n in (2, 3, 5)]
        waiting.append(asyncio.create_task(batcher.submit([seq(4, 900), seq(6, 950)], tag="two-rows")))
        await until(lambda: batcher.queue_depth == 5)
        model.release()
        submissions = await asyncio.gather(*waiting)
        await blocker
    mixed = model.batches[-1]
    assert sorted(map(len, mixed)) == [2, 3, 4, 5, 6]
    by_first_id = {row[0]: tag for row, tag in zip(mixed, model.tags[-1], strict=True)}
    assert by_first_id == {20: "t2", 30: "t3", 50: "t5", 900: "two-rows", 950: "two-rows"}
    batch_compute = log.calls[-1][4]
    tokens = [2, 3, 5, 10]
    for submission, n in zip(submissions, tokens, strict=True):
        assert submission.compute_s == pytest.approx(batch_compute * n / 20, rel=1e-9)
    assert sum(s.compute_s for s in submissions) == pytest.approx(batch_compute, rel=1e-9)


async def test_a_departed_request_being_computed_returns_only_after_its_forward_pass(model: Model) -> None:
    """``submit`` never returns while a forward pass still reads the request's rows (and tags): an adapter
    released by a departed request cannot have its pages reused under a running batch."""
    model.hold()
    async with make(model) as batcher:
        computing = asyncio.create_task(batcher.submit([seq(3)], tag="adapter"))
        await asyncio.to_thread(model.entered.wait, 5)
        computing.cancel()
        await asyncio.sleep(0.05)
        assert not computing.done()  # still waiting for the forward pass that holds its row
        model.release()
        with pytest.raises(asyncio.CancelledError):
            await computing
    assert model.tags == [["adapter"]]
