"""One model's queue and inference loop: requests in, token-budgeted batches through the model, results out.

Shaped after text-embeddings-inference (``core/src/queue.rs``, ``infer.rs``) and Ray Serve
(``serve/batching.py``): a request takes a permit before it is queued (none free: :class:`QueueFull`), the
loop forms batches under a size cap and a padded-token cap, runs them one at a time in a dedicated worker
thread, and resolves one future per request. It knows nothing of HTTP or tenants: a request may carry an opaque
``tag`` that the forward pass receives beside each of its rows (the shared base uses it for the row's adapter).

Forward passes run on an executor that the caller may share between batchers (``ModelServer`` gives every
batcher on a device the same single thread: concurrent forwards on one CPU only contend for the same cores, and
one thread allocating activations keeps one malloc arena instead of one per model).

When to dispatch: a request that finds the worker idle and the queue empty goes at once with whatever is
queued by then (a lone request pays no wait). Requests that queued up while a batch was computing are
dispatched as soon as the worker frees up if they fill a batch, otherwise after the oldest of them has
waited ``max_wait_ms`` (which, under load, it usually already has).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

log = logging.getLogger("modelmeter.models.batching")

R = TypeVar("R")
Run = Callable[[list[list[int]], list[Any]], list[R]]
OnBatch = Callable[[int, int, int, float, float], None]


class QueueFull(Exception):
    """No permit is free: the batcher already holds ``max_queue`` requests."""


class BatcherClosed(Exception):
    """The batcher was closed before the request could be served."""


@dataclass(frozen=True, slots=True)
class Submission(Generic[R]):
    """A served request: one result per input, in input order, and where its time went."""

    results: list[R]
    queue_s: float  # from submit until the first of its inputs started computing
    inference_s: float  # from then until its last input was computed
    compute_s: float = 0.0  # this request's share of its batches' forward time, by tokens


@dataclass(eq=False, slots=True)
class _Request(Generic[R]):
    future: asyncio.Future[None]
    results: list[R | None]
    remaining: int
    enqueued: float
    origin: object = None
    started: float | None = None
    finished: float = 0.0
    compute_s: float = 0.0

    def deliver(self, index: int, result: R, now: float, compute_share: float) -> None:
        self.results[index] = result
        self.compute_s += compute_share
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.finished = now
            self.future.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(eq=False, slots=True)
class _Item(Generic[R]):
    request: _Request[R]
    index: int
    ids: list[int]
    tag: Any
    enqueued: float
    ready_at: float  # when waiting for a fuller batch stops being worth it


class Batcher(Generic[R]):
    """Per-model queue and inference loop; ``run(ids, tags)`` is the backend's forward pass."""

    def __init__(
        self,
        run: Run[R],
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        max_padding_ratio: float = 1.3,
        on_batch: OnBatch | None = None,
        name: str = "batcher",
        executor: ThreadPoolExecutor | None = None,
        on_origins: Callable[[int], None] | None = None,
    ) -> None:
        if min(max_batch_tokens, max_batch_size, max_queue) <= 0 or max_wait_ms < 0:
            raise ValueError("caps must be positive and max_wait_ms non-negative")
        self._run = run
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_padding_ratio = max_padding_ratio
        self._on_batch = on_batch
        self._on_origins = on_origins  # distinct request origins (the engine's fronts) per batch
        self._name = name
        # Grouping by length looks this far into the queue: enough to find neighbours, cheap when deep.
        self._lookahead = max(4 * max_batch_size, 256)
        self._pending: deque[_Item[R]] = deque()
        self._pending_tokens = 0
        self._running: list[_Item[R]] = []
        self._batch_done = asyncio.Event()  # set when the running batch's forward pass has returned
        self._permits_used = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-forward")
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Inputs waiting for a batch (not counting the batch being computed)."""
        return len(self._pending)

    @property
    def requests_in_flight(self) -> int:
        """Requests holding a permit: queued or being computed."""
        return self._permits_used

    async def submit(self, ids: list[list[int]], tag: Any = None, *, origin: object = None) -> Submission[R]:
        """Queue one request's inputs and wait for all their results; :class:`QueueFull` when no permit.

        ``tag`` goes to the forward pass with each of the request's rows; ``origin`` (opaque: the engine passes the
        front a request came from) is only counted, per batch, for ``on_origins``."""
        if self._closed:
            raise BatcherClosed(f"{self._name} is closed")
        if self._permits_used >= self.max_queue:
            raise QueueFull(f"{self._name} already holds {self.max_queue} requests")
        self._permits_used += 1
        try:
            return await self._serve(ids, tag, origin)
        finally:
            self._permits_used -= 1

    async def close(self) -> None:
        """Stop the loop; queued and computing requests fail with :class:`BatcherClosed`."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        error = BatcherClosed(f"{self._name} was closed")
        for item in self._pending:
            item.request.fail(error)
        self._pending.clear()
        self._pending_tokens = 0
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Batcher[R]:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _serve(self, ids: list[list[int]], tag: Any, origin: object) -> Submission[R]:
        now = time.perf_counter()
        if not ids:
            return Submission(results=[], queue_s=0.0, inference_s=0.0)
        request = self._enqueue(ids, tag, now, origin)
        try:
            await request.future
        except asyncio.CancelledError:
            self._drop(request)
            await self._settle(request)
            raise
        started = request.started if request.started is not None else request.finished
        results = cast(list[R], request.results)  # every slot is filled once the future resolved
        return Submission(
            results=results,
            queue_s=started - now,
            inference_s=request.finished - started,
            compute_s=request.compute_s,
        )

    async def _settle(self, request: _Request[R]) -> None:
        """A departed request whose rows are being computed waits for that forward pass to end: ``submit`` never
        returns while a forward pass still reads its rows' tags (an adapter's pages may be reused once it does)."""
        if any(item.request is request for item in self._running):
            await asyncio.shield(self._batch_done.wait())

    def _enqueue(self, ids: list[list[int]], tag: Any, now: float, origin: object = None) -> _Request[R]:
        loop = asyncio.get_running_loop()
        request: _Request[R] = _Request(loop.create_future(), [None] * len(ids), len(ids), now, origin)
        # A request that finds the worker idle and nothing queued goes at once: there is nothing to wait for.
        idle = not self._pending and not self._running
        ready_at = now if idle else now + self.max_wait_s
        self._pending.extend(_Item(request, i, row, tag, now, ready_at) for i, row in enumerate(ids))
        self._pending_tokens += sum(len(row) for row in ids)
        if self._task is None:
            self._task = loop.create_task(self._loop(), name=f"{self._name}-loop")
        self._wakeup.set()
        return request

    def _drop(self, request: _Request[R]) -> None:
        """Remove a departed or failed request's inputs from the queue."""
        kept = [item for item in self._pending if item.request is not request]
        self._pending = deque(kept)
        self._pending_tokens = sum(len(item.ids) for item in kept)

    async def _loop(self) -> None:
        while True:
            try:
                batch = await self._next_batch()
                if batch:
                    await self._execute(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one bad batch
                log.exception("%s: batch loop error", self._name)

    async def _next_batch(self) -> list[_Item[R]]:
        if self._pending:
            await self._wait_to_fill()
        else:
            await self._wait_for_work()
        return self._take()

    async def _wait_for_work(self) -> None:
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _wait_to_fill(self) -> None:
        deadline = self._pending[0].ready_at
        while self._pending and not self._full():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _full(self) -> bool:
        return len(self._pending) >= self.max_batch_size or self._pending_tokens >= self.max_batch_tokens

    def _take(self) -> list[_Item[R]]:
        """Pop the oldest live input plus the queued inputs closest to it in length, within both caps."""
        window = [self._pending.popleft() for _ in range(min(len(self._pending), self._lookahead))]
        self._pending_tokens -= sum(len(item.ids) for item in window)
        live = [item for item in window if not item.request.future.done()]
        if not live:
            return []
        chosen = self._choose(live)
        picked = {id(item) for item in chosen}
        rest = [item for item in live if id(item) not in picked]
        self._pending.extendleft(reversed(rest))
        self._pending_tokens += sum(len(item.ids) for item in rest)
        return chosen

    def _choose(self, live: list[_Item[R]]) -> list[_Item[R]]:
        # The oldest input always goes (no starvation); neighbours in length waste the least padding.
        anchor = len(live[0].ids)
        order = sorted(range(len(live)), key=lambda i: (abs(len(live[i].ids) - anchor), i))
        chosen: list[_Item[R]] = []
        width = real = 0
        for i in order:
            if len(chosen) == self.max_batch_size:
                break
            n = len(live[i].ids)
            new_width = max(width, n)
            padded = (len(chosen) + 1) * new_width
            # Padding is compute spent on nothing: inputs too far in length wait for a batch of their own,
            # which the loop starts as soon as this one is done.
            if chosen and (padded > self.max_batch_tokens or padded > self.max_padding_ratio * (real + n)):
                continue
            chosen.append(live[i])
            width, real = new_width, real + n
        return chosen

    async def _execute(self, batch: list[_Item[R]]) -> None:
        started = time.perf_counter()
        for item in batch:
            if item.request.started is None:
                item.request.started = started
        self._running, self._batch_done = batch, asyncio.Event()
        try:
            results, compute_s = await asyncio.get_running_loop().run_in_executor(
                self._executor, _timed, self._run, [item.ids for item in batch], [item.tag for item in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(f"run returned {len(results)} results for {len(batch)} inputs")
        except asyncio.CancelledError:
            self._fail(batch, BatcherClosed(f"{self._name} was closed"))
            raise
        except Exception as exc:
            self._fail(batch, exc)
            return
        finally:
            self._running = []
            self._batch_done.set()
        self._deliver(batch, results, compute_s)
        self._report(batch, started, compute_s)

    def _deliver(self, batch: list[_Item[R]], results: list[R], compute_s: float) -> None:
        now = time.perf_counter()
        per_token = compute_s / max(1, sum(len(item.ids) for item in batch))
        for item, result in zip(batch, results, strict=True):
            item.request.deliver(item.index, result, now, per_token * len(item.ids))

    def _fail(self, batch: list[_Item[R]], error: Exception) -> None:
        log.warning("%s: batch of %d failed: %r", self._name, len(batch), error)
        for request in {id(item.request): item.request for item in batch}.values():
            request.fail(error)
            self._drop(request)

    def _report(self, batch: list[_Item[R]], started: float, compute_s: float) -> None:
        if self._on_origins is not None:
            self._on_origins(len({id(item.request.origin) for item in batch}))
        if self._on_batch is None:
            return
        real = sum(len(item.ids) for item in batch)
        padded = len(batch) * max(len(item.ids) for item in batch)
        waited = started - min(item.enqueued for item in batch)
        try:
            self._on_batch(len(batch), real, padded, waited, compute_s)
        except Exception:  # telemetry must never break serving
            log.exception("%s: on_batch callback failed", self._name)


def _timed(run: Run[R], ids: list[list[int]], tags: list[Any]) -> tuple[list[R], float]:
    started = time.perf_counter()
    results = run(ids, tags)
    return results, time.perf_counter() - started
