"""The model server with adapters: one batcher per base, a byte-budgeted adapter pool, eviction and reload under
concurrent traffic, a corrupt adapter failing alone, full copies beside adapters (tiny random BERTs)."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from modelmeter.models.adapters.artifact import ADAPTER_WEIGHTS
from modelmeter.models.pool import ModelLoadError
from modelmeter.models.serving import AdapterConfig, BatchCaps, ModelServer, ModelSource
from tests.tiny_bert import make_tiny_adapter, make_tiny_bert, merged_classifier

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]
CPU = torch.device("cpu")
TEXTS = ["fine", "a dull and tedious film, start to finish", "warm and wise", "meh " * 30]




@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("models")
    base = make_tiny_bert(root / "base", "feature-extraction")
    labels = [["neg", "pos"], ["a", "b", "c"], ["x", "y"], ["p", "q", "r", "s"]]
    adapters = [make_tiny_adapter(root / f"ad{i}", base, names, rank=4, seed=i) for i, names in enumerate(labels)]
    full = make_tiny_bert(root / "full", "text-classification", ["bad", "good"])
    merged = [merged_classifier(base, path, len(names)) for path, names in zip(adapters, labels, strict=True)]
    return {"base": base, "adapters": adapters, "labels": labels, "full": full, "merged": merged}


def make_server(budget_bytes: int, **caps: Any) -> ModelServer:
    options = {"max_batch_tokens": 4096, "max_batch_size": 16, "max_wait_ms": 5.0, "max_queue": 256} | caps
    return ModelServer(device=CPU, memory_budget_bytes=1 << 30, caps=BatchCaps(**options),
                       adapters=AdapterConfig(budget_bytes=budget_bytes, max_labels=8))


def base_source(tree: dict[str, Any]) -> ModelSource:
    return ModelSource("tiny-base", tree["base"], "feature-extraction")


def adapter_source(tree: dict[str, Any], i: int, path: Path | None = None) -> ModelSource:
    return ModelSource(f"ad{i}", path or tree["adapters"][i], "text-classification", base=base_source(tree))


async def classify(server: ModelServer, source: ModelSource, text: str) -> Any:
    async with server.use(source) as lease:
        ids = lease.backend.tokenize([text], truncate=False).ids
        submission = await lease.batcher.submit(ids, lease.tag)
        return submission.results[0], ids[0]


def expected(tree: dict[str, Any], i: int, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        return [float(p) for p in tree["merged"][i](input_ids=torch.tensor([ids])).logits.softmax(-1)[0]]


async def adapter_bytes(tree: dict[str, Any]) -> int:
    server = make_server(1 << 30)
    try:
        await classify(server, adapter_source(tree, 0), "x")
        return server.shared_bases()[0].adapters.used_bytes
    finally:
        await server.close()


async def test_adapters_and_the_base_share_one_batcher(tree: dict[str, Any]) -> None:
    server = make_server(1 << 30)
    try:
        sources = [base_source(tree)] + [adapter_source(tree, i) for i in range(4)]
        outcomes = await asyncio.gather(*(classify(server, s, t) for s in sources for t in TEXTS))
        assert server.bases.loaded() == ["tiny-base"]
        assert server.pool.loaded() == []
        base = server.shared_bases()[0]
        assert sorted(base.adapters.loaded()) == ["ad0", "ad1", "ad2", "ad3"]
        for (result, ids), (source, _) in zip(outcomes, [(s, t) for s in sources for t in TEXTS], strict=True):
            if source.base is None:
                assert isinstance(result, list)
                assert len(result) == 32
            else:
                i = int(source.model_id[2:])
                assert list(result) == tree["labels"][i]
                assert list(result.values()) == pytest.approx(expected(tree, i, ids), abs=1e-5)
    finally:
        await server.close()


async def test_eviction_and_reload_under_concurrent_traffic(tree: dict[str, Any]) -> None:
    """A budget for two adapters, traffic over four: adapters are evicted and reloaded, every answer is exact."""
    size = await adapter_bytes(tree)
    server = make_server(2 * size + size // 2)
    rng = random.Random(3)
    calls = [(rng.randrange(4), rng.choice(TEXTS)) for _ in range(120)]

    async def one(i: int, text: str) -> None:
        result, ids = await classify(server, adapter_source(tree, i), text)
        assert list(result) == tree["labels"][i]
        assert list(result.values()) == pytest.approx(expected(tree, i, ids), abs=1e-5)

    try:
        for start in range(0, len(calls), 12):  # waves of concurrent requests over all four adapters
            await asyncio.gather(*(one(i, t) for i, t in calls[start:start + 12]))
        pool = server.shared_bases()[0].adapters
        assert pool.load_count > 4
        assert pool.eviction_count > 0
        assert len(pool.loaded()) <= 2
        assert pool.used_bytes <= pool.memory_budget_bytes
    finally:
        await server.close()


async def test_an_adapter_in_use_keeps_its_pages(tree: dict[str, Any]) -> None:
    """Over budget while a request computes with adapter 0: it is not evicted, and its rows stay its own."""
    size = await adapter_bytes(tree)
    server = make_server(size)
    gate, entered = threading.Event(), threading.Event()
    try:
        await classify(server, adapter_source(tree, 0), "warm-up")
        base = server.shared_bases()[0]
        forward = base.backend.forward

        def held(ids: list[list[int]], tags: list[Any]) -> Any:
            entered.set()
            gate.wait(5)
            return forward(ids, tags)

        base.batcher._run = held  # the next batch waits inside the forward pass
        first = asyncio.create_task(classify(server, adapter_source(tree, 0), TEXTS[1]))
        await asyncio.to_thread(entered.wait, 5)
        async with server.use(adapter_source(tree, 1)), server.use(adapter_source(tree, 2)):
            assert "ad0" in base.adapters.loaded()  # pinned: still resident although the pool is over budget
        assert base.adapters.loaded() == ["ad0"]  # the unpinned ones went, although ad0 is the least recent
        base.batcher._run = forward
        gate.set()
        result, ids = await first
        assert list(result.values()) == pytest.approx(expected(tree, 0, ids), abs=1e-5)
        assert base.adapters.used_bytes <= base.adapters.memory_budget_bytes
    finally:
        gate.set()
        await server.close()


async def test_a_corrupt_adapter_fails_alone(tree: dict[str, Any], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tree["adapters"][1].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    server = make_server(1 << 30)
    try:
        good = [classify(server, adapter_source(tree, 0), t) for t in TEXTS]
        bad = [classify(server, adapter_source(tree, 1, broken), t) for t in TEXTS]
        outcomes = await asyncio.gather(*good, *bad, return_exceptions=True)
        for result in outcomes[: len(good)]:
            assert not isinstance(result, BaseException)
        for error in outcomes[len(good):]:
            assert isinstance(error, ModelLoadError)
            assert "AdapterError" in error.reason
        assert server.shared_bases()[0].adapters.loaded() == ["ad0"]
        # Repaired on disk: the next request loads it.
        (broken / ADAPTER_WEIGHTS).write_bytes((tree["adapters"][1] / ADAPTER_WEIGHTS).read_bytes())
        result, ids = await classify(server, adapter_source(tree, 1, broken), TEXTS[0])
        assert list(result.values()) == pytest.approx(expected(tree, 1, ids), abs=1e-5)
    finally:
        await server.close()


async def test_full_copies_still_have_their_own_pool(tree: dict[str, Any]) -> None:
    server = make_server(1 << 30)
    try:
        full = ModelSource("full", tree["full"], "text-classification")
        (result, _), (other, _) = await asyncio.gather(classify(server, full, "good"),
                                                       classify(server, adapter_source(tree, 0), "good"))
        assert list(result) == ["bad", "good"]
        assert list(other) == ["neg", "pos"]
        assert server.pool.loaded() == ["full"]
        assert server.bases.loaded() == ["tiny-base"]
    finally:
        await server.close()
