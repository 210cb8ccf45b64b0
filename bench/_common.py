"""Helpers shared by the benchmarks: a throwaway platform on a temporary SQLite data dir."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from modelmeter.settings import Settings

ADMIN_TOKEN = "mmadmin_bench-token-0123456789"


def bench_settings(**overrides: Any) -> Settings:
    """Settings on a fresh temp data dir (or MODELMETER_DATABASE_URL when set)."""
    data_dir = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    return Settings(
        data_dir=data_dir,
        database_url=os.environ.get("MODELMETER_DATABASE_URL") or None,
        admin_token=ADMIN_TOKEN,
        start_worker=False,
        **overrides,
    )


async def run_for(
    call: Callable[[], Awaitable[Any]], *, seconds: float, concurrency: int
) -> tuple[int, list[float]]:
    """Run ``call`` from ``concurrency`` tasks for ``seconds``; returns (count, latencies in seconds)."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []

    async def loop() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return len(latencies), latencies


def p50_ms(latencies: list[float]) -> float:
    return statistics.median(latencies) * 1000
