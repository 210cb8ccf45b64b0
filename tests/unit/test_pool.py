"""The model pool: one load per model however many ask, LRU eviction under a budget, failed loads retried."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import pytest

from modelmeter.models.pool import ModelLoadError, ModelPool

pytestmark = pytest.mark.anyio



@dataclass
class FakeModel:
    model_id: str
    memory_bytes: int


@dataclass
class Loader:
    """Counts loads per id; slow enough that concurrent callers overlap; fails ids listed in ``failing``."""

    size: int = 100
    delay_s: float = 0.05
    failing: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, model_id: str) -> FakeModel:
        with self.lock:
            self.calls.append(model_id)
        time.sleep(self.delay_s)
        if self.failing.get(model_id, 0) > 0:
            self.failing[model_id] -= 1
            raise OSError(f"no weights for {model_id}")
        return FakeModel(model_id, self.size)


@dataclass
class Events:
    loads: list[tuple[str, float]] = field(default_factory=list)
    evictions: list[str] = field(default_factory=list)

    def on_load(self, model_id: str, seconds: float) -> None:
        self.loads.append((model_id, seconds))

    def pool(self, loader: Loader, budget: int) -> ModelPool[FakeModel]:
        return ModelPool(loader, budget, on_load=self.on_load, on_evict=self.evictions.append)


async def test_concurrent_first_gets_load_once() -> None:
    loader, events = Loader(), Events()
    pool = events.pool(loader, 1000)
    models = await asyncio.gather(*(pool.get("m") for _ in range(16)))
    assert loader.calls == ["m"]
    assert all(model is models[0] for model in models)
    assert [model_id for model_id, _ in events.loads] == ["m"]
    assert events.loads[0][1] >= loader.delay_s
    assert (pool.loaded(), pool.used_bytes, pool.load_count) == (["m"], 100, 1)
    assert await pool.get("m") is models[0]
    assert loader.calls == ["m"]


async def test_least_recently_used_is_evicted_to_stay_in_budget() -> None:
    loader, events = Loader(delay_s=0), Events()
    pool = events.pool(loader, 250)
    for model_id in ("a", "b", "c"):
        await pool.get(model_id)
    assert (pool.loaded(), events.evictions, pool.used_bytes) == (["b", "c"], ["a"], 200)
    await pool.get("b")
    await pool.get("d")
    assert (pool.loaded(), events.evictions, pool.eviction_count) == (["b", "d"], ["a", "c"], 2)
    await pool.get("a")
    assert loader.calls == ["a", "b", "c", "d", "a"]


async def test_the_model_just_loaded_is_kept_even_over_budget() -> None:
    pool = ModelPool(Loader(delay_s=0, size=100), 50)
    await pool.get("a")
    assert pool.loaded() == ["a"]
    await pool.get("b")
    assert pool.loaded() == ["b"]
    assert pool.used_bytes == 100


async def test_models_in_use_are_not_evicted() -> None:
    loader, events = Loader(delay_s=0), Events()
    pool = events.pool(loader, 150)
    async with pool.use("a") as model:
        assert model.model_id == "a"
        await pool.get("b")
        await pool.get("c")
        assert "a" in pool.loaded()
    assert pool.loaded() == ["c"]
    assert events.evictions == ["b", "a"]


async def test_failed_load_reaches_every_waiter_and_is_retried() -> None:
    loader = Loader(failing={"x": 1})
    pool = ModelPool(loader, 1000)
    outcomes = await asyncio.gather(*(pool.get("x") for _ in range(4)), return_exceptions=True)
    assert all(isinstance(error, ModelLoadError) for error in outcomes)
    error = outcomes[0]
    assert isinstance(error, ModelLoadError)
    assert error.model_id == "x"
    assert "OSError: no weights for x" in error.reason
    assert (pool.loaded(), loader.calls) == ([], ["x"])
    model = await pool.get("x")
    assert model.model_id == "x"
    assert loader.calls == ["x", "x"]


async def test_a_departed_waiter_does_not_abort_the_load() -> None:
    loader = Loader(delay_s=0.05)
    pool = ModelPool(loader, 1000)
    first = asyncio.create_task(pool.get("m"))
    await asyncio.sleep(0.01)
    first.cancel()
    model = await pool.get("m")
    assert first.cancelled()
    assert (model.model_id, loader.calls) == ("m", ["m"])


async def test_explicit_eviction() -> None:
    loader, events = Loader(delay_s=0), Events()
    pool = events.pool(loader, 1000)
    model = await pool.get("a")
    assert pool.peek("a") is model
    assert pool.peek("b") is None
    assert pool.evict("a") is True
    assert pool.evict("a") is False
    assert (pool.loaded(), pool.used_bytes, events.evictions) == ([], 0, ["a"])


async def test_on_evict_sees_the_model_and_failing_hooks_are_contained() -> None:
    seen: list[FakeModel | None] = []

    def on_evict(model_id: str) -> None:
        seen.append(pool.peek(model_id))
        raise RuntimeError("telemetry down")

    def on_load(model_id: str, seconds: float) -> None:
        raise RuntimeError("telemetry down")

    pool = ModelPool(Loader(delay_s=0), 150, on_load=on_load, on_evict=on_evict)
    first = await pool.get("a")
    await pool.get("b")
    assert (pool.loaded(), seen) == (["b"], [first])


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="memory_budget_bytes must be positive"):
        ModelPool(Loader(), 0)


async def test_admit_runs_after_room_is_made_and_before_the_model_is_visible() -> None:
    """An adapter pool writes the adapter into its pages in ``admit``: the evicted model's room is free by then."""
    seen: list[tuple[str, list[str]]] = []
    pool: ModelPool[FakeModel] = ModelPool(Loader(delay_s=0), 150,
                                           admit=lambda model_id, _: seen.append((model_id, pool.loaded())))
    await pool.get("a")
    await pool.get("b")
    assert seen == [("a", []), ("b", [])]  # "a" was evicted before "b" was admitted
    assert pool.loaded() == ["b"]


async def test_a_failing_admit_fails_the_load_and_stores_nothing() -> None:
    def admit(model_id: str, model: FakeModel) -> None:
        raise RuntimeError("no free pages")

    pool: ModelPool[FakeModel] = ModelPool(Loader(delay_s=0), 1000, admit=admit)
    with pytest.raises(ModelLoadError, match="no free pages"):
        await pool.get("a")
    assert (pool.loaded(), pool.used_bytes) == ([], 0)


async def test_a_model_in_use_is_never_evicted_explicitly() -> None:
    pool = ModelPool(Loader(delay_s=0), 1000)
    async with pool.use("a"):
        assert pool.evict("a") is False
        assert pool.loaded() == ["a"]
    assert pool.evict("a") is True


async def test_use_pins_the_model_it_returns_even_if_evicted_while_waiting() -> None:
    """A waiter resumed after another admission evicted the model it waited for loads it again, then pins it."""
    loader = Loader(delay_s=0.02)
    pool = ModelPool(loader, 100)
    async def hold(model_id: str) -> str:
        async with pool.use(model_id) as model:
            assert pool.peek(model_id) is model
            await asyncio.sleep(0.01)
            return model.model_id

    assert await asyncio.gather(hold("a"), hold("b"), hold("a")) == ["a", "b", "a"]
