"""The one background loop: blocking steps in a thread, async steps on the loop, a first pass at start when asked,
failures retried, and stop waiting for the pass in flight."""

from __future__ import annotations

import asyncio
import threading

import pytest

from modelmeter.periodic import Periodic

pytestmark = pytest.mark.anyio


async def test_blocking_step_runs_in_a_worker_thread_and_repeats() -> None:
    threads: list[str] = []
    loop = Periodic(lambda: threads.append(threading.current_thread().name), name="t")
    loop.start(0.01)
    while len(threads) < 3:
        await asyncio.sleep(0.01)
    await loop.stop()
    assert threading.main_thread().name not in threads


async def test_async_step_runs_on_the_loop_first_pass_immediately_and_failures_are_retried() -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("first pass fails")

    loop = Periodic(step, name="a", immediately=True)
    loop.start(3600)  # only the immediate pass can run within this test
    await asyncio.sleep(0.05)
    assert calls == [0]
    await loop.stop()
    retried = Periodic(step, name="b")
    retried.start(0.01)
    while len(calls) < 3:
        await asyncio.sleep(0.01)
    await retried.stop()


async def test_stop_waits_for_the_pass_in_flight() -> None:
    started, finished = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        threading.Event().wait(0.2)
        finished.set()

    loop = Periodic(slow, name="slow", immediately=True)
    loop.start(3600)
    while not started.is_set():
        await asyncio.sleep(0.01)
    await loop.stop()
    assert finished.is_set()
    assert loop.stopping
