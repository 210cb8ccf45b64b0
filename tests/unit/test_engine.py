"""The engine over its real ZMQ socket, in this process: a RemoteEngine client against an EngineCore serving tiny
BERTs answers what the in-process engine answers; garbage on the socket is dropped and counted; a departed client's
rows are cancelled; a stopped engine fails requests in flight and new ones with EngineUnavailable, and a restarted
one on the same socket is found again. Plus the wire format and the simulated device."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
import zmq.asyncio

from modelmeter.models.batching import QueueFull
from modelmeter.models.engine import protocol as p
from modelmeter.models.engine.client import EngineUnavailable, RemoteEngine
from modelmeter.models.engine.core import EngineCore, EngineCounters
from modelmeter.models.engine.local import LocalEngine
from modelmeter.models.pool import ModelLoadError
from modelmeter.models.serving import AdapterConfig, BatchCaps, ModelServer, ServerHooks
from modelmeter.models.simulated import SimulatedDevice
from modelmeter.models.source import ModelSource
from modelmeter.models.text import TextEncoder
from tests.tiny_bert import make_tiny_adapter, make_tiny_bert

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]
CPU = torch.device("cpu")
TEXTS = ["fine", "a dull and tedious film, start to finish", "warm and wise", "meh " * 30]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_tiny_bert(root / "base", "feature-extraction")
    return {"base": base, "adapter": make_tiny_adapter(root / "ad", base, ["neg", "pos"], rank=4),
            "full": make_tiny_bert(root / "full", "text-classification", ["bad", "good"])}


def sources(tree: dict[str, Path]) -> list[ModelSource]:
    base = ModelSource("tiny-base", tree["base"], "feature-extraction")
    return [base, ModelSource("ad", tree["adapter"], "text-classification", base=base),
            ModelSource("full", tree["full"], "text-classification")]


def make_server(counters: EngineCounters, *, simulated: SimulatedDevice | None = None,
                max_queue: int = 256) -> ModelServer:
    return ModelServer(device=CPU, memory_budget_bytes=1 << 30,
                       caps=BatchCaps(max_batch_tokens=4096, max_batch_size=16, max_wait_ms=5.0, max_queue=max_queue),
                       adapters=AdapterConfig(budget_bytes=1 << 26, max_labels=8),
                       on_batch=lambda _: counters.wrap(None), on_origins=counters.on_origins, simulated=simulated)


class Running:
    def __init__(self, core: EngineCore, task: asyncio.Task[None]) -> None:
        self.core, self.task = core, task

    async def stop(self) -> None:
        self.core.stop()
        await self.task
        await self.core.server.close()


async def start_engine(path: Path, **options: Any) -> Running:
    counters = EngineCounters()
    core = EngineCore(make_server(counters, **options), counters, path=path, simulated="simulated" in options)
    return Running(core, asyncio.get_running_loop().create_task(core.run()))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[Running, RemoteEngine]]:
    path = tmp_path / "run" / "engine-00.sock"
    running = await start_engine(path)
    client = RemoteEngine([path], ping_s=0.05, hang_s=1.0)
    await client.start()
    assert await client.wait_ready(10)
    yield running, client
    await client.aclose()
    if not running.task.done():
        await running.stop()


def tokens(tree: dict[str, Path], texts: list[str]) -> list[list[int]]:
    return TextEncoder.load(tree["base"]).tokenize(texts, truncate=True).ids


async def test_remote_answers_equal_the_in_process_engine(engine: tuple[Running, RemoteEngine],
                                                         tree: dict[str, Path]) -> None:
    _, client = engine
    local = LocalEngine(make_server(EngineCounters()))
    ids = tokens(tree, TEXTS)
    try:
        for source in sources(tree):
            remote_rows = (await client.submit(source, ids)).results
            local_rows = (await local.submit(source, ids)).results
            assert len(remote_rows) == len(local_rows) == len(TEXTS)
            for r, lo in zip(remote_rows, local_rows, strict=True):
                if isinstance(lo, dict):
                    assert isinstance(r, dict)
                    assert list(r) == list(lo)
                    assert max(abs(r[k] - lo[k]) for k in lo) < 1e-5
                else:
                    assert max(abs(a - b) for a, b in zip(r, lo, strict=True)) < 1e-5
    finally:
        await local.aclose()
    assert all(client.device_for(source) == "cpu" for source in sources(tree))
    fronts, engines = await client.stats()
    assert fronts == [os.getpid()]
    assert engines[0].rows >= 3 * len(TEXTS)
    assert engines[0].pid == os.getpid()


async def test_socket_directory_is_private(engine: tuple[Running, RemoteEngine]) -> None:
    running, _ = engine
    mode = stat.S_IMODE(running.core.path.parent.stat().st_mode)
    assert mode == 0o700


async def test_concurrent_requests_share_batches(engine: tuple[Running, RemoteEngine], tree: dict[str, Path]) -> None:
    running, client = engine
    source = sources(tree)[0]
    ids = tokens(tree, TEXTS)
    await asyncio.gather(*(client.submit(source, [ids[i % 4]]) for i in range(40)))
    counters = running.core.counters
    assert counters.rows >= 40
    assert counters.batches < counters.rows


async def test_garbage_is_dropped_and_counted_and_the_engine_keeps_serving(
        engine: tuple[Running, RemoteEngine], tree: dict[str, Path]) -> None:
    running, client = engine
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(f"ipc://{running.core.path}")
    bad_infer = p.to_engine_encoder.encode(p.Infer(1, p.wire(sources(tree)[0]), b"\x01\x02\x03", b"\x09\x00\x00\x00"))
    for junk in (b"", b"\xff" * 64, b"\x93\x01\x02", p.to_engine_encoder.encode([99, "nope"]), bad_infer):
        await raw.send(junk)
    await raw.send_multipart([b"two", b"frames"])
    # The malformed Infer is answered with a failure (its rid is known); the rest are only counted.
    reply = p.to_front_decoder.decode(await asyncio.wait_for(raw.recv(), 5))
    assert isinstance(reply, p.Failed)
    assert reply.code == "engine_error"
    raw.close(linger=0)
    ctx.term()
    assert running.core.counters.dropped_messages == 6
    assert len((await client.submit(sources(tree)[0], tokens(tree, ["still here"]))).results) == 1


async def test_cancelled_request_is_dropped_by_the_engine(tmp_path: Path, tree: dict[str, Path]) -> None:
    path = tmp_path / "run" / "e.sock"
    running = await start_engine(path, simulated=SimulatedDevice(batch_ms=300, row_us=0))
    client = RemoteEngine([path], ping_s=0.05)
    await client.start()
    try:
        assert await client.wait_ready(10)
        source = sources(tree)[0]
        await client.submit(source, [[101, 102]])  # loaded
        first = asyncio.ensure_future(client.submit(source, [[101, 102]]))  # occupies the device for 300 ms
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(client.submit(source, [[101, 7, 102]]))
        await asyncio.sleep(0.05)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await first
        await asyncio.sleep(0.1)
        assert not running.core._tasks  # the engine dropped the cancelled request's task
        assert running.core.counters.rows == 2  # the warm-up and the first: the cancelled row never ran
    finally:
        await client.aclose()
        await running.stop()


async def test_engine_errors_map_to_the_routes_errors(tmp_path: Path, tree: dict[str, Path]) -> None:
    path = tmp_path / "run" / "e.sock"
    running = await start_engine(path, simulated=SimulatedDevice(batch_ms=200, row_us=0), max_queue=1)
    client = RemoteEngine([path], ping_s=0.05)
    await client.start()
    try:
        assert await client.wait_ready(10)
        missing = ModelSource("gone", tmp_path / "nowhere", "text-classification")
        with pytest.raises(ModelLoadError):
            await client.submit(missing, [[101, 102]])
        source = sources(tree)[0]
        outcomes = await asyncio.gather(*(client.submit(source, [[101, 102]]) for _ in range(3)),
                                        return_exceptions=True)
        assert any(isinstance(o, QueueFull) for o in outcomes)
    finally:
        await client.aclose()
        await running.stop()


async def test_stopped_engine_fails_fast_and_a_restarted_one_is_found(tmp_path: Path, tree: dict[str, Path]) -> None:
    path = tmp_path / "run" / "e.sock"
    running = await start_engine(path, simulated=SimulatedDevice(batch_ms=500, row_us=0))
    client = RemoteEngine([path], ping_s=0.05, hang_s=1.0)
    await client.start()
    try:
        assert await client.wait_ready(10)
        source = sources(tree)[0]
        in_flight = asyncio.ensure_future(client.submit(source, [[101, 102]]))
        await asyncio.sleep(0.1)
        await running.stop()  # the socket closes under a request in flight
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(in_flight, 2)
        assert not client.ready()
        with pytest.raises(EngineUnavailable):
            await client.submit(source, [[101, 102]])
        running = await start_engine(path)
        assert await client.wait_ready(10)
        assert len((await client.submit(source, [[101, 102]])).results) == 1
    finally:
        await client.aclose()
        if not running.task.done():
            await running.stop()


def test_ids_and_floats_round_trip() -> None:
    rows = [[101, 2023, 102], [101, 102], [5] * 300]
    assert p.unpack_ids(*p.pack_ids(rows)) == rows
    with pytest.raises(ValueError, match="row lengths"):
        p.unpack_ids(*p.pack_ids(rows)[:1], p.pack_ids([[1]])[1])
    vectors = [[0.5, -0.25, 1.0], [0.0, 2.0, -3.5]]
    assert p.unpack_floats(p.pack_floats(vectors), 2, 3) == vectors
    with pytest.raises(ValueError, match="shape"):
        p.unpack_floats(p.pack_floats(vectors), 3, 3)


def test_simulated_device_parses_and_shapes_outputs() -> None:
    device = SimulatedDevice.parse("batch_ms=1, row_us=2")
    assert device == SimulatedDevice(1.0, 2.0)
    assert device.wait_s(500) == pytest.approx(0.002)
    for bad in ("batch_ms", "fast=1", "batch_ms=-1", "row_us=nan"):
        with pytest.raises(ValueError, match="simulated device"):
            SimulatedDevice.parse(bad)
    run = SimulatedDevice(0, 0).forward(labels_of=lambda tag: ["a", "b", "c"] if tag else None, dimensions=8)
    vector, scores = run([[101, 5, 102], [101, 6, 102]], [None, "adapter"])
    assert isinstance(vector, list)
    assert len(vector) == 8
    assert sum(x * x for x in vector) == pytest.approx(1.0)
    assert isinstance(scores, dict)
    assert list(scores) == ["a", "b", "c"]
    assert sum(scores.values()) == pytest.approx(1.0)
    assert run([[101, 5, 102]], [None]) == [vector]  # deterministic


def test_hooks_type_is_importable() -> None:
    assert ServerHooks().on_origins is None
