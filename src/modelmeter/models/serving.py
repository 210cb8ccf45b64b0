"""The models a request can run on, loaded on demand, and the batcher each request joins. No HTTP, no tenants.

Three kinds of model, one way in (:meth:`ModelServer.use`):
- a **base** (a platform feature-extraction BERT) is loaded once and kept. It has one batcher, shared by its own
  embedding rows and by the rows of every LoRA adapter trained on it, and its own adapter pool;
- an **adapter** (a tenant's LoRA fine-tune) joins its base's batcher; the adapter pool keeps adapters resident
  under ``adapter_budget_bytes`` (LRU) and loads them off the event loop;
- a **full copy** (a tenant's full fine-tune) has its own backend and batcher in the memory-budgeted LRU pool.
Every batcher on the device runs its forward passes on one shared thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from modelmeter.models.adapters.backend import AdapterBackend, OnAdapterBatch, ResidentAdapter
from modelmeter.models.backends import BertBackend, Result, Task
from modelmeter.models.batching import Batcher, OnBatch
from modelmeter.models.batchqueue import Activity
from modelmeter.models.pool import ModelPool
from modelmeter.models.simulated import SimulatedDevice
from modelmeter.models.source import ModelSource
from modelmeter.settings import Settings

__all__ = ["AdapterConfig", "AdapterHooks", "BatchCaps", "Lease", "ModelServer", "ModelSource", "SharedBase",
           "build_model_server"]
MIB = 1024 * 1024
DEFAULT_ADAPTER_DEVICE_MB = 1024

log = logging.getLogger("modelmeter.serving")


@dataclass(frozen=True, slots=True)
class BatchCaps:
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    max_padding_ratio: float = 1.3
    low_share: float = 0.2  # of the rows served, at most, for low-priority rows beside interactive ones
    low_max_rows: int = 8  # a batch of low-priority rows alone, at most
    low_idle_ms: float = 20.0  # float-ok: how long no interactive row was seen before low rows go alone


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """Adapter pool sizing: the resident budget, and the device tier (``None``: one tier, the CPU default)."""

    budget_bytes: int
    device_bytes: int | None = None
    max_labels: int = 100


@dataclass(frozen=True, slots=True)
class Lease:
    """What a request runs on: the backend (tokenizer), the batcher to join and the tag its rows carry."""

    model_id: str
    backend: BertBackend
    batcher: Batcher[Result]
    tag: ResidentAdapter | None = None


@dataclass(eq=False)
class ServedModel:
    """A full model copy and the batcher that feeds it."""

    model_id: str
    backend: BertBackend
    batcher: Batcher[Result]

    @property
    def memory_bytes(self) -> int:
        return self.backend.memory_bytes


@dataclass(eq=False)
class SharedBase:
    """A base model, its batcher (shared by every adapter on it) and its adapter pool."""

    model_id: str
    backend: AdapterBackend
    batcher: Batcher[Result]
    adapters: ModelPool[ResidentAdapter]
    paths: dict[str, Path]

    @property
    def memory_bytes(self) -> int:
        return self.backend.memory_bytes


@dataclass(frozen=True, slots=True)
class AdapterHooks:
    """Telemetry for adapter pools, per base: ``on_load(base, adapter, s)``, ``on_evict(base, adapter)``,
    ``on_batch(base)`` → the backend's per-batch callback."""

    on_load: Callable[[str, str, float], None] | None = None
    on_evict: Callable[[str, str], None] | None = None
    on_batch: Callable[[str], OnAdapterBatch] | None = None


class ModelServer:
    """Bases, their adapters and full copies, loaded on first use; one forward thread for the device."""

    def __init__(
        self,
        *,
        device: torch.device,
        memory_budget_bytes: int,
        caps: BatchCaps,
        adapters: AdapterConfig | None = None,
        on_batch: Callable[[str], OnBatch | None] | None = None,
        on_load: Callable[[str, float], None] | None = None,
        on_evict: Callable[[str], None] | None = None,
        adapter_hooks: AdapterHooks | None = None,
        simulated: SimulatedDevice | None = None,
        on_origins: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self.simulated = simulated
        self._on_origins = on_origins
        self._caps = caps
        self._adapter_config = adapters or AdapterConfig(budget_bytes=1024 * 1024 * 1024)
        self._on_batch = on_batch
        self._on_evict = on_evict
        self._hooks = adapter_hooks or AdapterHooks()
        self._sources: dict[str, ModelSource] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        self._lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{device.type}")
        self._activity = Activity()  # every batcher here shares the lane: batch rows wait for the device's pauses
        self.pool: ModelPool[ServedModel] = ModelPool(
            self._load, memory_budget_bytes, on_load=on_load, on_evict=self._evicted
        )
        # Bases are few (the platform's catalog) and hold their adapters: loaded once, never evicted.
        # A base is built on the forward thread: its page pools are allocated with torch ops that run OpenMP
        # parallel regions, and a second OpenMP team (the loader thread's) left beside the forward thread's makes
        # libgomp throttle its spin-waits on a small machine: every later forward pass then pays for sleeping
        # workers (one sentence 17-20 ms against 7-9 ms, ~1.1 cores busy instead of ~1.9 on 2 cores; this was the
        # served-throughput regression since round 1, found by A/B against d010bd6).
        self.bases: ModelPool[SharedBase] = ModelPool(self._on_lane(self._load_base), sys.maxsize, on_load=on_load)

    def _on_lane(self, load: Callable[[str], SharedBase]) -> Callable[[str], SharedBase]:
        """``load`` run on the forward thread (the pool calls the result from a worker thread, which waits)."""
        return lambda model_id: self._lane.submit(load, model_id).result()

    @property
    def adapter_config(self) -> AdapterConfig:
        return self._adapter_config

    def _batcher(self, model_id: str, backend: BertBackend) -> Batcher[Result]:
        return Batcher(
            self._forward(backend),
            max_batch_tokens=self._caps.max_batch_tokens,
            max_batch_size=self._caps.max_batch_size,
            max_wait_ms=self._caps.max_wait_ms,
            max_queue=self._caps.max_queue,
            max_padding_ratio=self._caps.max_padding_ratio,
            on_batch=self._on_batch(model_id) if self._on_batch else None,
            name=f"batcher:{model_id}",
            executor=self._lane,
            on_origins=self._on_origins,
            low_share=self._caps.low_share,
            low_max_rows=self._caps.low_max_rows,
            low_idle_ms=self._caps.low_idle_ms,
            activity=self._activity,
        )

    def _forward(self, backend: BertBackend) -> Callable[..., list[Result]]:
        if self.simulated is None:
            return backend.forward
        labels, task = backend.labels, backend.task

        def labels_of(tag: object) -> Sequence[str] | None:
            return tag.labels if isinstance(tag, ResidentAdapter) else labels

        def task_of(tag: object) -> str:
            return tag.task if isinstance(tag, ResidentAdapter) else task

        return self.simulated.forward(labels_of=labels_of, dimensions=backend.dimensions, task_of=task_of)

    def _load(self, model_id: str) -> ServedModel:
        source = self._sources[model_id]
        backend = BertBackend.load(source.path, task=cast(Task, source.task), device=self.device)
        return ServedModel(model_id, backend, self._batcher(model_id, backend))

    def _load_base(self, model_id: str) -> SharedBase:
        source, config = self._sources[model_id], self._adapter_config
        backend = AdapterBackend.load_base(
            source.path, device=self.device, budget_bytes=config.budget_bytes, device_bytes=config.device_bytes,
            max_batch_size=self._caps.max_batch_size, max_labels=config.max_labels,
        )
        if self._hooks.on_batch is not None:
            backend.on_adapter_batch = self._hooks.on_batch(model_id)
        paths: dict[str, Path] = {}
        on_load = self._hooks.on_load

        def release(adapter_id: str) -> None:
            adapter = pool.peek(adapter_id)
            if adapter is not None:
                backend.release(adapter)
            if self._hooks.on_evict is not None:
                self._hooks.on_evict(model_id, adapter_id)

        pool: ModelPool[ResidentAdapter] = ModelPool(
            lambda adapter_id: backend.read_adapter(adapter_id, paths[adapter_id]), config.budget_bytes,
            admit=lambda _, adapter: backend.admit(adapter), on_evict=release,
            on_load=(lambda adapter_id, s: on_load(model_id, adapter_id, s)) if on_load else None,
        )
        return SharedBase(model_id, backend, self._batcher(model_id, backend), pool, paths)

    def _evicted(self, model_id: str) -> None:
        model = self.pool.peek(model_id)
        if model is not None:
            task = asyncio.get_running_loop().create_task(self._close(model))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if self._on_evict is not None:
            self._on_evict(model_id)

    async def _close(self, model: ServedModel) -> None:
        await model.batcher.close()
        del model
        _return_freed_memory()

    @asynccontextmanager
    async def use(self, source: ModelSource) -> AsyncIterator[Lease]:
        """What a request runs on, loaded if needed and pinned (not evictable) while the block runs."""
        if source.base is not None:
            async with self._base(source.base) as base, self._adapter(base, source) as adapter:
                yield Lease(source.model_id, base.backend, base.batcher, adapter)
        elif source.task == "feature-extraction":
            async with self._base(source) as base:
                yield Lease(source.model_id, base.backend, base.batcher)
        else:
            self._sources[source.model_id] = source
            async with self.pool.use(source.model_id) as served:
                yield Lease(source.model_id, served.backend, served.batcher)

    def _base(self, source: ModelSource) -> Any:
        self._sources[source.model_id] = source
        return self.bases.use(source.model_id)

    def _adapter(self, base: SharedBase, source: ModelSource) -> Any:
        base.paths[source.model_id] = source.path
        return base.adapters.use(source.model_id)

    def shared_bases(self) -> list[SharedBase]:
        return [b for b in (self.bases.peek(i) for i in self.bases.loaded()) if b is not None]

    async def close(self) -> None:
        for pool in (self.pool, self.bases):
            for model_id in pool.loaded():
                model = pool.peek(model_id)
                if model is not None:
                    await model.batcher.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._lane.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class ServerHooks:
    """Telemetry callbacks of a model server (see :class:`ModelServer`)."""

    on_batch: Callable[[str], OnBatch | None] | None = None
    on_load: Callable[[str, float], None] | None = None
    on_evict: Callable[[str], None] | None = None
    adapters: AdapterHooks | None = None
    on_origins: Callable[[int], None] | None = None  # distinct fronts per batch (the engine's counter)


def build_model_server(settings: Settings, *, device: torch.device, hooks: ServerHooks | None = None,
                       simulated: SimulatedDevice | None = None) -> ModelServer:
    """The model server an engine runs on ``device``, sized by ``settings``."""
    hooks = hooks or ServerHooks()
    device_mb = settings.adapter_device_mb
    if device_mb is None:  # auto: two tiers on CUDA (device pages backed by host memory), one on the CPU
        device_mb = DEFAULT_ADAPTER_DEVICE_MB if device.type == "cuda" else 0
    adapters = AdapterConfig(budget_bytes=settings.adapter_pool_mb * MIB,
                             device_bytes=device_mb * MIB if device_mb else None, max_labels=settings.max_labels)
    return ModelServer(
        device=device,
        memory_budget_bytes=settings.pool_memory_mb * MIB,
        caps=BatchCaps(settings.max_batch_tokens, settings.max_batch_size, settings.max_wait_ms,
                       settings.max_queue_requests, settings.max_padding_ratio, settings.batch_share,
                       settings.batch_max_rows, settings.batch_idle_ms),
        adapters=adapters, on_batch=hooks.on_batch, on_load=hooks.on_load, on_evict=hooks.on_evict,
        adapter_hooks=hooks.adapters, simulated=simulated, on_origins=hooks.on_origins,
    )


def _return_freed_memory() -> None:
    """Give the heap pages that evicted models and adapters freed back to the system (glibc keeps them otherwise,
    and the process's resident memory would stay at its high-water mark instead of within the budgets)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    return trim if callable(trim) else None


_MALLOC_TRIM = _find_malloc_trim()
