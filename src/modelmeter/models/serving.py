"""A loaded model with its batcher, and the server that keeps them in the pool. No HTTP, no tenants."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelmeter.models.backends import BertBackend, Result, Task
from modelmeter.models.batching import Batcher, OnBatch
from modelmeter.models.pool import ModelPool

log = logging.getLogger("modelmeter.serving")


@dataclass(frozen=True, slots=True)
class BatchCaps:
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    max_padding_ratio: float = 1.3


@dataclass(eq=False)
class ServedModel:
    """A backend and the batcher that feeds it."""

    model_id: str
    backend: BertBackend
    batcher: Batcher[Result]

    @property
    def memory_bytes(self) -> int:
        return self.backend.memory_bytes


class ModelServer:
    """Loads models on first use into a memory-budgeted LRU pool, each with its own batcher."""

    def __init__(
        self,
        *,
        device: torch.device,
        memory_budget_bytes: int,
        caps: BatchCaps,
        on_batch: Callable[[str], OnBatch | None] | None = None,
        on_load: Callable[[str, float], None] | None = None,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        self.device = device
        self._caps = caps
        self._on_batch = on_batch
        self._on_evict = on_evict
        self._sources: dict[str, tuple[Path, Task]] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        self.pool: ModelPool[ServedModel] = ModelPool(
            self._load, memory_budget_bytes, on_load=on_load, on_evict=self._evicted
        )

    def _load(self, model_id: str) -> ServedModel:
        path, task = self._sources[model_id]
        backend = BertBackend.load(path, task=task, device=self.device)
        batcher: Batcher[Result] = Batcher(
            backend.forward,
            max_batch_tokens=self._caps.max_batch_tokens,
            max_batch_size=self._caps.max_batch_size,
            max_wait_ms=self._caps.max_wait_ms,
            max_queue=self._caps.max_queue,
            max_padding_ratio=self._caps.max_padding_ratio,
            on_batch=self._on_batch(model_id) if self._on_batch else None,
            name=f"batcher:{model_id}",
        )
        return ServedModel(model_id, backend, batcher)

    def _evicted(self, model_id: str) -> None:
        model = self.pool.peek(model_id)
        if model is not None:
            task = asyncio.get_running_loop().create_task(model.batcher.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if self._on_evict is not None:
            self._on_evict(model_id)

    @asynccontextmanager
    async def use(self, model_id: str, *, path: Path, task: Task) -> AsyncIterator[ServedModel]:
        """The served model, loaded if needed and pinned (not evictable) while the block runs."""
        self._sources[model_id] = (path, task)
        async with self.pool.use(model_id) as served:
            yield served

    async def close(self) -> None:
        for model_id in self.pool.loaded():
            model = self.pool.peek(model_id)
            if model is not None:
                await model.batcher.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
