"""Loaded models under a memory budget: load on first use, once; evict the least recently used.

The pool holds whatever its ``loader`` returns (a :class:`~modelmeter.models.backends.BertBackend`, or a
backend bundled with its batcher) as long as it reports ``memory_bytes``. It lives on one event loop;
loading runs in a worker thread so the loop keeps serving while a model loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("modelmeter.models.pool")


class Sized(Protocol):
    """What the pool needs from a loaded model."""

    @property
    def memory_bytes(self) -> int: ...


M = TypeVar("M", bound=Sized)


class ModelLoadError(Exception):
    """A model could not be loaded; every caller waiting for that load gets this."""

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(f"could not load model {model_id!r}: {reason}")
        self.model_id = model_id
        self.reason = reason


class ModelPool(Generic[M]):
    """Models loaded on demand, kept in LRU order under ``memory_budget_bytes``.

    A model's size is known only once loaded, so the pool makes room for it (evicting the least recently
    used) when its load finishes and before admitting it: memory exceeds the budget only by the model being
    loaded. A model in use (see :meth:`use`) or just loaded is never evicted; when only such models remain, the
    pool stays over budget until they are released.

    ``admit(model_id, model)`` runs on the event loop once room was made and before the model is visible (an
    adapter pool writes the adapter into its resident stacks there); if it raises, the load fails.
    ``on_evict`` runs before an evicted model is dropped and may release what ``admit`` took.
    """

    def __init__(
        self,
        loader: Callable[[str], M],
        memory_budget_bytes: int,
        *,
        on_load: Callable[[str, float], None] | None = None,
        on_evict: Callable[[str], None] | None = None,
        admit: Callable[[str, M], None] | None = None,
    ) -> None:
        if memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be positive")
        self._loader = loader
        self._budget = memory_budget_bytes
        self._on_load = on_load
        self._on_evict = on_evict
        self._admit_hook = admit
        self._models: OrderedDict[str, M] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._loading: dict[str, asyncio.Task[M]] = {}
        self._pins: Counter[str] = Counter()
        self.load_count = 0
        self.eviction_count = 0

    @property
    def memory_budget_bytes(self) -> int:
        return self._budget

    @property
    def used_bytes(self) -> int:
        """Bytes held by the loaded models, as they reported when loaded."""
        return sum(self._sizes.values())

    def loaded(self) -> list[str]:
        """Ids of the loaded models, least recently used first."""
        return list(self._models)

    def peek(self, model_id: str) -> M | None:
        """The model if loaded, without loading it or refreshing its LRU position."""
        return self._models.get(model_id)

    async def get(self, model_id: str) -> M:
        """The model, loaded on first use; concurrent first calls share one load."""
        model = self._models.get(model_id)
        if model is not None:
            self._models.move_to_end(model_id)
            return model
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.create_task(self._load(model_id), name=f"load-model:{model_id}")
            task.add_done_callback(_retrieve)
            self._loading[model_id] = task
        # One caller giving up (a client disconnecting) must not abort the load the others wait for.
        return await asyncio.shield(task)

    @asynccontextmanager
    async def use(self, model_id: str) -> AsyncIterator[M]:
        """Get the model and keep it from eviction until the block exits."""
        model = await self.get(model_id)
        # Between a load finishing and this waiter resuming, another admission may have evicted the model:
        # pin only the model that is still loaded (no await between the check and the pin).
        while self._models.get(model_id) is not model:
            model = await self.get(model_id)
        self._pins[model_id] += 1
        try:
            yield model
        finally:
            self._pins[model_id] -= 1
            if self._pins[model_id] <= 0:
                del self._pins[model_id]
                self._enforce_budget(keep=None)

    def evict(self, model_id: str) -> bool:
        """Drop a model now; ``False`` if it is not loaded or is in use (what ``admit`` placed for it, such as an
        adapter's rows in the resident stacks, must not be reused while a request still computes with it).

        ``on_evict`` runs first, so it can still :meth:`peek` the model (to close its batcher, say).
        """
        if model_id not in self._models or model_id in self._pins:
            return False
        _call_hook(self._on_evict, model_id)
        del self._models[model_id]
        del self._sizes[model_id]
        self.eviction_count += 1
        log.info("evicted model %s", model_id)
        return True

    async def _load(self, model_id: str) -> M:
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(self._loader, model_id)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(model_id, f"{type(exc).__name__}: {exc}") from exc
        finally:
            del self._loading[model_id]
        self._admit(model_id, model, time.perf_counter() - started)
        return model

    def _admit(self, model_id: str, model: M, seconds: float) -> None:
        size = int(model.memory_bytes)
        self._enforce_budget(keep=None, incoming=size)
        if self._admit_hook is not None:
            try:
                self._admit_hook(model_id, model)
            except Exception as exc:
                raise ModelLoadError(model_id, f"{type(exc).__name__}: {exc}") from exc
        self._models[model_id] = model
        self._sizes[model_id] = size
        self.load_count += 1
        log.info("loaded model %s (%d bytes) in %.2fs", model_id, size, seconds)
        _call_hook(self._on_load, model_id, seconds)

    def _enforce_budget(self, *, keep: str | None, incoming: int = 0) -> None:
        for model_id in list(self._models):
            if self.used_bytes + incoming <= self._budget:
                return
            if model_id != keep and model_id not in self._pins:
                self.evict(model_id)


def _call_hook(hook: Callable[..., None] | None, *args: object) -> None:
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:  # telemetry hooks must never break loading or eviction
        log.exception("pool hook %r failed", hook)


def _retrieve(task: asyncio.Task[object]) -> None:
    # A load nobody awaits any more must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()
