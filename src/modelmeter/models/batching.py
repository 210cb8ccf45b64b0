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

Priorities (the Batch API's contract: batch rows reach the engine behind interactive ones, and use what is left).
A request is interactive (``priority=0``) or low (``priority>0``: a batch file's line). Low rows wait in a queue
of their own with ``max_queue`` permits of their own, so a batch backlog never makes an interactive request meet
:class:`QueueFull` and never lengthens the scans that form interactive batches. Everything above is the
interactive rows' behaviour, unchanged: low rows are not counted in "the queue is empty", "a batch is full" or
the ``max_wait_ms`` wait, so they never hold an interactive row back. A batch is chosen from the interactive rows
exactly as without priorities; low rows then fill what is left of it under the same caps (size, padded tokens,
padding ratio), up to ``low_share`` of the rows served: each interactive row earns ``low_share / (1 - low_share)``
of a low row's place, and a low row takes one place (at the default 0.2, one low row per four interactive rows,
also when every batch holds only one or two; what is earned carries over by less than one row, so no burst of
low rows ever lands on one batch). With no interactive row waiting, low rows go alone, at most ``low_max_rows`` a
batch, once no interactive row has been queued or computed for ``low_idle_ms``: clients that just got their
answers are usually about to send again, and a low batch started in that gap would hold their next rows back
(measured on the 2-core CPU, where a pass of 8 rows costs ~50 ms, in ``bench/batches.py``). Under a load of
interactive rows that never lets up, low rows get their share of the rows and no more; that is the contract
(they use what is left).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from modelmeter.models.batchqueue import Activity, Item, Request, RowQueue

log = logging.getLogger("modelmeter.models.batching")

R = TypeVar("R")
Run = Callable[[list[list[int]], list[Any]], list[R]]
OnBatch = Callable[[int, int, int, float, float], None]


class QueueFull(Exception):
    """No permit is free: the batcher already holds ``max_queue`` requests (of the request's priority)."""


class BatcherClosed(Exception):
    """The batcher was closed before the request could be served."""


@dataclass(frozen=True, slots=True)
class Submission(Generic[R]):
    """A served request: one result per input, in input order, and where its time went."""

    results: list[R]
    queue_s: float  # from submit until the first of its inputs started computing
    inference_s: float  # from then until its last input was computed
    compute_s: float = 0.0  # this request's share of its batches' forward time, by tokens


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
        low_share: float = 0.2,
        low_max_rows: int = 8,
        low_idle_ms: float = 20.0,
        activity: Activity | None = None,
    ) -> None:
        if min(max_batch_tokens, max_batch_size, max_queue) <= 0 or max_wait_ms < 0:
            raise ValueError("caps must be positive and max_wait_ms non-negative")
        if not 0 <= low_share <= 1 or low_max_rows < 1 or low_idle_ms < 0:
            raise ValueError("low_share must be within 0..1, low_max_rows positive, low_idle_ms non-negative")
        self._run = run
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_padding_ratio = max_padding_ratio
        self.low_share = low_share
        self.low_max_rows = low_max_rows
        self.low_idle_s = low_idle_ms / 1000
        self._low_credit = 0.0  # low rows' places earned by interactive rows, not yet taken
        self._low_cap = max(1, math.floor(max_batch_size * low_share))  # the most places kept for later
        self._activity = activity or Activity()  # the device's interactive traffic (its own when not shared)
        self._on_batch = on_batch
        self._on_origins = on_origins  # distinct request origins (the engine's fronts) per batch
        self._name = name
        lookahead = max(4 * max_batch_size, 256)
        self._pending: RowQueue[R] = RowQueue(lookahead)  # interactive
        self._low: RowQueue[R] = RowQueue(lookahead)
        self._running: list[Item[R]] = []
        self._batch_done = asyncio.Event()  # set when the running batch's forward pass has returned
        self._permits = [0, 0]  # held by interactive requests, by low ones (indexed by ``low``)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-forward")
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Inputs waiting for a batch, of both priorities (not counting the batch being computed)."""
        return len(self._pending) + len(self._low)

    @property
    def low_queue_depth(self) -> int:
        """Low-priority inputs waiting for a batch."""
        return len(self._low)

    @property
    def requests_in_flight(self) -> int:
        """Interactive requests holding a permit (of ``max_queue``): queued or being computed."""
        return self._permits[0]

    @property
    def low_requests_in_flight(self) -> int:
        """Low-priority requests holding a permit (``max_queue`` more, their own)."""
        return self._permits[1]

    async def submit(self, ids: list[list[int]], tag: Any = None, *, origin: object = None,
                     priority: int = 0) -> Submission[R]:
        """Queue one request's inputs and wait for all their results; :class:`QueueFull` when no permit.

        ``tag`` goes to the forward pass with each of the request's rows; ``origin`` (opaque: the engine passes the
        front a request came from) is only counted, per batch, for ``on_origins``. ``priority`` 0 is interactive,
        above 0 low (served behind interactive rows, with permits of its own); below 0 is a ``ValueError``."""
        if self._closed:
            raise BatcherClosed(f"{self._name} is closed")
        if priority < 0:
            raise ValueError(f"priority must be 0 (interactive) or more (low), not {priority}")
        low = priority > 0
        if self._permits[low] >= self.max_queue:
            raise QueueFull(f"{self._name} already holds {self.max_queue} {'low' if low else 'interactive'} requests")
        self._permits[low] += 1
        if not low:
            self._activity.interactive_requests += 1
        try:
            return await self._serve(ids, tag, origin, low)
        finally:
            self._permits[low] -= 1
            if not low:
                self._activity.interactive_requests -= 1
                self._activity.interactive_at = time.perf_counter()  # its client is about to send again

    async def close(self) -> None:
        """Stop the loop; queued and computing requests fail with :class:`BatcherClosed`."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        error = BatcherClosed(f"{self._name} was closed")
        self._pending.fail_all(error)
        self._low.fail_all(error)
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Batcher[R]:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _serve(self, ids: list[list[int]], tag: Any, origin: object, low: bool) -> Submission[R]:
        now = time.perf_counter()
        if not ids:
            return Submission(results=[], queue_s=0.0, inference_s=0.0)
        request = self._enqueue(ids, tag, now, origin, low)
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

    async def _settle(self, request: Request[R]) -> None:
        """A departed request whose rows are being computed waits for that forward pass to end: ``submit`` never
        returns while a forward pass still reads its rows' tags (an adapter's pages may be reused once it does)."""
        if any(item.request is request for item in self._running):
            await asyncio.shield(self._batch_done.wait())

    def _enqueue(self, ids: list[list[int]], tag: Any, now: float, origin: object = None,
                 low: bool = False) -> Request[R]:
        loop = asyncio.get_running_loop()
        request: Request[R] = Request(loop.create_future(), [None] * len(ids), len(ids), now, origin, low)
        if low:  # never waited for: low rows go when the worker has nothing interactive to do
            self._low.add([Item(request, i, row, tag, now, now) for i, row in enumerate(ids)])
        else:
            # A request that finds the worker idle and nothing interactive queued goes at once: nothing to wait for.
            idle = not self._pending and not self._running
            ready_at = now if idle else now + self.max_wait_s
            self._pending.add([Item(request, i, row, tag, now, ready_at) for i, row in enumerate(ids)])
            self._activity.interactive_at = now
        if self._task is None:
            self._task = loop.create_task(self._loop(), name=f"{self._name}-loop")
        self._wakeup.set()
        return request

    def _drop(self, request: Request[R]) -> None:
        """Remove a departed or failed request's inputs from its queue."""
        (self._low if request.low else self._pending).drop(request)

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

    async def _next_batch(self) -> list[Item[R]]:
        if not self._pending and not self._low:
            await self._wait_for_work()
        if not self._pending:
            await self._wait_for_idle()
        if self._pending:
            await self._wait_to_fill()
        return self._take()

    async def _wait_for_idle(self) -> None:
        """Low rows alone wait until the device has had no interactive request in flight and none seen for
        ``low_idle_s`` (an interactive arrival on this batcher ends the wait: it goes first)."""
        if self.low_idle_s == 0:
            return
        while not self._pending:
            activity = self._activity
            remaining = activity.interactive_at + self.low_idle_s - time.perf_counter()
            if activity.interactive_requests > 0:  # another model's, queued or computing: look again shortly
                remaining = max(remaining, self.low_idle_s or 0.001)
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):  # then look again: the device may have been busy meanwhile
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    async def _wait_for_work(self) -> None:
        while not self._pending and not self._low:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _wait_to_fill(self) -> None:
        deadline = self._pending.items[0].ready_at
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
        return len(self._pending) >= self.max_batch_size or self._pending.tokens >= self.max_batch_tokens

    def _take(self) -> list[Item[R]]:
        """The next batch: the oldest live interactive input plus the interactive inputs closest to it in length,
        within both caps; then low inputs in what the share leaves. With no interactive input: low ones alone."""
        live = self._pending.window()
        if live:
            # Places the low rows have earned are kept free of interactive rows while low rows wait: otherwise
            # interactive load that fills every batch would never let them in.
            reserved = min(math.floor(self._low_credit + 1e-9), self._low_cap) if self._low else 0
            chosen = self._choose(live, max(1, self.max_batch_size - reserved))
            self._pending.put_back(live, chosen)
            room = self._low_room(len(chosen))
            joining: list[Item[R]] = []
            if room and self._low:
                low = self._low.window()
                joining = self._choose(low, room, chosen) if low else []
                self._low.put_back(low, joining)
            self._spend_low(len(joining), waiting=bool(self._low))
            return chosen + joining
        low = self._low.window()
        if not low:
            return []
        chosen = self._choose(low, self.low_max_rows)
        self._low.put_back(low, chosen)
        return chosen

    def _low_room(self, interactive: int) -> int:
        """How many low rows may join ``interactive`` interactive rows: the places earned so far (each interactive
        row earns ``low_share / (1 - low_share)``, so that over time ``low <= low_share * (low + interactive)``),
        within the size cap."""
        room = self.max_batch_size - interactive
        if self.low_share < 1:  # the epsilon keeps 3 * 0.25 / 0.75 at 1 whatever the float rounding
            self._low_credit += interactive * self.low_share / (1 - self.low_share)
            room = min(room, math.floor(self._low_credit + 1e-9))
        return max(0, room)

    def _spend_low(self, joined: int, *, waiting: bool = False) -> None:
        """``joined`` low rows took their places. With none left waiting, less than one place carries over (no
        burst when a batch arrives later); with some still waiting (a cap kept them out), the places are kept, up
        to a full batch's share."""
        self._low_credit = min(self._low_credit - joined, self._low_cap if waiting else 0.999)

    def _choose(self, live: list[Item[R]], limit: int, batch: Sequence[Item[R]] = ()) -> list[Item[R]]:
        """Up to ``limit`` of ``live`` to join ``batch``: those closest in length first, within both caps and the
        padding ratio. With no ``batch``, the oldest of ``live`` anchors a new one and always goes (no starvation);
        neighbours in length waste the least padding."""
        # Distance in length from the batch's lengths (rows within them add no width), or from the anchor's.
        lengths = [len(item.ids) for item in batch] or [len(live[0].ids)]
        lo, hi = min(lengths), max(lengths)
        order = sorted(range(len(live)), key=lambda i: (max(lo - len(live[i].ids), len(live[i].ids) - hi, 0), i))
        chosen = list(batch)
        width = max(lengths) if batch else 0
        real = sum(lengths) if batch else 0
        for i in order:
            if len(chosen) - len(batch) == limit or len(chosen) == self.max_batch_size:
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
        return chosen[len(batch):]

    async def _execute(self, batch: list[Item[R]]) -> None:
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
        if any(not item.request.low for item in batch):
            self._activity.interactive_at = time.perf_counter()  # their clients are about to send again
        self._deliver(batch, results, compute_s)
        self._report(batch, started, compute_s)

    def _deliver(self, batch: list[Item[R]], results: list[R], compute_s: float) -> None:
        now = time.perf_counter()
        per_token = compute_s / max(1, sum(len(item.ids) for item in batch))
        for item, result in zip(batch, results, strict=True):
            item.request.deliver(item.index, result, now, per_token * len(item.ids))

    def _fail(self, batch: list[Item[R]], error: Exception) -> None:
        log.warning("%s: batch of %d failed: %r", self._name, len(batch), error)
        for request in {id(item.request): item.request for item in batch}.values():
            request.fail(error)
            self._drop(request)

    def _report(self, batch: list[Item[R]], started: float, compute_s: float) -> None:
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
