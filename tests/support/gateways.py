"""Gateway processes on a test's settings: ``modelmeter serve --no-worker`` (one, or several sharing its database and
Redis, each on its own loopback port), and ``serve --workers 2`` (two fronts and an engine process)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from modelmeter.settings import Settings
from tests.conftest import ADMIN_TOKEN, bearer
from tests.processes import stop, wait_until
from tests.support.net import free_port, wait_ready


def gateway_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``settings``' data dir, database, Redis (none: unset), admin token and
    plans file, and ``extra`` on top."""
    env = {**os.environ, "MODELMETER_DATA_DIR": str(settings.data_dir), "MODELMETER_ADMIN_TOKEN": ADMIN_TOKEN}
    if settings.database_url:
        env["MODELMETER_DATABASE_URL"] = settings.database_url
    if settings.redis_url:
        env["MODELMETER_REDIS_URL"] = settings.redis_url
    else:
        env.pop("MODELMETER_REDIS_URL", None)
    if settings.plans_file is not None:
        env["MODELMETER_PLANS_FILE"] = str(settings.plans_file)
    return env | dict(extra or {})


def start_gateway(settings: Settings, port: int, extra_env: Mapping[str, str] | None = None,
                  args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """One gateway process at ``port`` (not waited for: see :func:`tests.support.net.wait_ready`); ``args`` go to
    ``serve`` (``--engine process``: an engine process beside it)."""
    return subprocess.Popen([sys.executable, "-m", "modelmeter.cli", "serve", "--port", str(port), "--no-worker",
                             *args],
                            env=gateway_env(settings, extra_env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def running_gateways(settings: Settings, count: int = 2,
                     extra_env: Mapping[str, str] | None = None) -> Iterator[list[str]]:
    """``count`` gateway processes on ``settings``, ready; their URLs. They are stopped when the block ends."""
    ports = [free_port() for _ in range(count)]
    processes = [start_gateway(settings, port, extra_env) for port in ports]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            wait_ready(url)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


async def warm_then_burst(urls: list[str], model: str, key: str, n: int, *, warm_input: Any = "x",
                          burst_input: Any = "x") -> list[httpx.Response]:
    """One ``/v1/classify`` per gateway first (each loads the model and must answer 200), then ``n`` at once spread
    over them in turn: the burst's responses, in order."""
    async with httpx.AsyncClient(timeout=60) as http:
        async def call(url: str, text: Any) -> httpx.Response:
            return await http.post(f"{url}/v1/classify", json={"model": model, "input": text}, headers=bearer(key))

        warm = [await call(url, warm_input) for url in urls]
        assert [r.status_code for r in warm] == [200] * len(urls), [r.text for r in warm]
        return list(await asyncio.gather(*(call(urls[i % len(urls)], burst_input) for i in range(n))))


# --- serve --workers 2: two torch-free fronts and one engine process ---------------------------------------------


def workers_env(settings: Settings, metrics_dir: Path, **extra: str) -> dict[str, str]:
    """The environment for ``serve --workers``: none of this process's MODELMETER_* variables, ``settings``' data dir
    and database, the admin token, ``metrics_dir`` for Prometheus' multiprocess files, and ``extra``.

    Several processes must share rate and quota counters: ``serve --workers`` refuses to run without Redis, which
    runs on every machine of this kind (and in CI) even when the suite itself runs on embedded defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMETER_")}
    env.update({"MODELMETER_DATA_DIR": str(settings.data_dir), "MODELMETER_DATABASE_URL": settings.database_url or "",
                "MODELMETER_ADMIN_TOKEN": ADMIN_TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                "MODELMETER_LOG_LEVEL": "warning",
                "MODELMETER_REDIS_URL": settings.redis_url or "redis://127.0.0.1:6379/15", **extra})
    return env


def engine_status(url: str) -> dict[str, Any]:
    """``GET /admin/engine``: the engine processes and the fronts."""
    found: dict[str, Any] = httpx.get(f"{url}/admin/engine", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                      timeout=10).json()
    return found


@dataclasses.dataclass(frozen=True)
class Fronts:
    url: str
    process: subprocess.Popen[bytes]
    metrics_dir: Path


@contextlib.contextmanager
def two_fronts(settings: Settings, tmp_path: Path, *, signum: int = signal.SIGTERM, stop_timeout_s: float = 60,
               **extra_env: str) -> Iterator[Fronts]:
    """``modelmeter serve --workers 2 --no-worker`` on a free port and ``settings``' database, ready (one engine,
    two fronts); its log in ``tmp_path/serve.log``, its metrics in ``tmp_path/prometheus``. Stopped with ``signum``
    when the block ends."""
    port, metrics_dir = free_port(), tmp_path / "prometheus"
    command = [sys.executable, "-m", "modelmeter.cli", "serve", "--workers", "2", "--no-worker", "--port", str(port)]
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(command, env=workers_env(settings, metrics_dir, **extra_env), stdout=log,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: httpx.get(f"{url}/readyz").is_success and len(engine_status(url)["fronts"]) == 2, 180,
                       "one engine and two fronts")
            yield Fronts(url, process, metrics_dir)
        finally:
            stop(process, signum=signum, timeout=stop_timeout_s)
