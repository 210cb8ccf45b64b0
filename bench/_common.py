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

ADMIN_TOKEN = "mmadmin_bench-token-0123456789abcdef0123"


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


def shared_dir() -> Path:
    """``shared/`` beside the repository (where CI and sessions lay it), or MODELMETER_SHARED_DIR."""
    override = os.environ.get("MODELMETER_SHARED_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared"


def sst2_rows(n: int | None = None, *, seed: int = 0) -> list[tuple[str, int]]:
    """Rows of the GLUE SST-2 training split, shuffled with ``seed`` (all when ``n`` is None)."""
    import random

    lines = (shared_dir() / "data" / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [(s, int(label)) for s, label in (line.rsplit("\t", 1) for line in lines)]
    random.Random(seed).shuffle(rows)
    return rows if n is None else rows[:n]
