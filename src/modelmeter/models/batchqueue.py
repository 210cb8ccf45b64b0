"""The batcher's waiting rows: a request and its rows (items), one priority's queue of them, and the interactive
activity every batcher on a device shares. Data structures only; :mod:`.batching` decides what goes when."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

R = TypeVar("R")


@dataclass(eq=False, slots=True)
class Request(Generic[R]):
    future: asyncio.Future[None]
    results: list[R | None]
    remaining: int
    enqueued: float
    origin: object = None
    low: bool = False  # low priority: its rows wait in the low queue
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
class Item(Generic[R]):
    request: Request[R]
    index: int
    ids: list[int]
    tag: Any
    enqueued: float
    ready_at: float  # when waiting for a fuller batch stops being worth it


class RowQueue(Generic[R]):
    """One priority's waiting inputs, oldest first, and their tokens; batches are taken from its first
    ``lookahead`` inputs (enough to find neighbours in length, cheap when the queue is deep)."""

    def __init__(self, lookahead: int) -> None:
        self.items: deque[Item[R]] = deque()
        self.tokens = 0
        self._lookahead = lookahead

    def __len__(self) -> int:
        return len(self.items)

    def add(self, items: list[Item[R]]) -> None:
        self.items.extend(items)
        self.tokens += sum(len(item.ids) for item in items)

    def window(self) -> list[Item[R]]:
        """Pop the first ``lookahead`` inputs; the live ones (a departed request's are left out)."""
        window = [self.items.popleft() for _ in range(min(len(self.items), self._lookahead))]
        self.tokens -= sum(len(item.ids) for item in window)
        return [item for item in window if not item.request.future.done()]

    def put_back(self, live: list[Item[R]], chosen: list[Item[R]]) -> None:
        """Return the window's inputs that were not chosen to the front of the queue, in their order."""
        picked = {id(item) for item in chosen}
        rest = [item for item in live if id(item) not in picked]
        self.items.extendleft(reversed(rest))
        self.tokens += sum(len(item.ids) for item in rest)

    def drop(self, request: Request[R]) -> None:
        kept = [item for item in self.items if item.request is not request]
        self.items = deque(kept)
        self.tokens = sum(len(item.ids) for item in kept)

    def fail_all(self, error: BaseException) -> None:
        for item in self.items:
            item.request.fail(error)
        self.items.clear()
        self.tokens = 0


@dataclass(slots=True)
class Activity:
    """Interactive traffic on one device, shared by every batcher whose forward passes run there (one forward
    thread): a model's low rows alone wait for the *device* to pause, not just their own model, or they would take
    turns on the thread with another model's interactive batches."""

    interactive_at: float = -math.inf  # when an interactive row was last queued or computed, on any batcher
    interactive_requests: int = 0  # interactive requests queued or computing, on any batcher
