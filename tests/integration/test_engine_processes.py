"""``serve --workers 2``: one engine process, two torch-free fronts, batches formed across them, and an engine
killed under load costs 503s (never a 500, never a bill for an unanswered request) until its replacement serves.

Runs on the database and Redis the suite is configured with (PostgreSQL + Redis in CI's first pass); Redis is
required by ``--workers > 1`` and runs on every machine of this kind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func
from sqlmodel import select

from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.services import services_of
from modelmeter.models.registry import BASE_MODEL_ID
from modelmeter.settings import Settings
from tests.conftest import bearer
from tests.processes import wait_until
from tests.support import gateways
from tests.support.gateways import engine_status
from tests.support.shared_data import sst2_rows

pytestmark = pytest.mark.slow  # the packaged base model, loaded by a real engine process

@pytest.fixture
def two_fronts(settings: Settings, tmp_path: Path, client: TestClient) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``modelmeter serve --workers 2`` on a free port and the test database, its log kept in tmp_path."""
    with gateways.two_fronts(settings, tmp_path, MODELMETER_TORCH_THREADS="1") as fronts:
        yield fronts.url, fronts.process


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _embed(url: str, headers: dict[str, str], text: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"model": BASE_MODEL_ID, "input": text}, headers=headers,
                      timeout=60)


def _ledger_rows(client: TestClient, tenant_id: str) -> int:
    services = services_of(client.app)
    with services.sessions() as session:
        query = select(func.count()).select_from(UsageEvent).where(UsageEvent.tenant_id == tenant_id)
        return int(session.exec(query).one())


def test_one_engine_two_fronts_share_batches_and_match_in_process(
        shared_data: Path, two_fronts: tuple[str, subprocess.Popen[bytes]], client: TestClient, make_tenant: Any,
        make_key: Any) -> None:
    url, process = two_fronts
    status = engine_status(url)
    assert len(status["engines"]) == 1
    assert len(status["fronts"]) == 2
    engine_pid, front_pids = status["engines"][0]["pid"], {f["pid"] for f in status["fronts"]}
    assert engine_pid not in front_pids
    assert process.pid not in front_pids | {engine_pid}
    assert engine_pid in _children(process.pid)
    # Fronts hold no torch and no weights; the engine does.
    for pid in front_pids:
        assert "libtorch" not in _maps(pid), f"front {pid} mapped libtorch"
    assert "libtorch" in _maps(engine_pid)

    tenant = make_tenant()
    headers = bearer(make_key(tenant["id"])["key"])
    texts = [text for text, _ in sst2_rows(shared_data, 64, seed=7)]
    with ThreadPoolExecutor(32) as pool:  # new connections each time: both fronts accept
        responses = list(pool.map(lambda t: _embed(url, headers, t), texts * 3))
    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    after = engine_status(url)["engines"][0]
    assert after["rows"] >= len(responses)
    assert after["batches"] < after["rows"], "rows were batched"
    assert after["mixed_batches"] > 0, "some batch carried rows of both fronts"
    assert after["dropped_messages"] == 0

    # The same vectors as the model computed in this process, to 1e-5.
    from modelmeter.models.backends import BertBackend
    from modelmeter.models.registry import BASE_MODEL_ARTIFACT, artifact_path

    backend = BertBackend.load(artifact_path(BASE_MODEL_ARTIFACT, Path(".")), task="feature-extraction",
                               device=__import__("torch").device("cpu"))
    served = {t: r.json()["data"][0]["embedding"] for t, r in zip(texts * 3, responses, strict=True)}
    for text in texts[:16]:
        local = backend.forward(backend.tokenize([text], truncate=False).ids)[0]
        assert max(abs(a - b) for a, b in zip(local, served[text], strict=True)) < 1e-5
    assert _ledger_rows(client, tenant["id"]) == len(responses)


def test_engine_killed_under_load_gives_503s_then_serves_again_and_bills_only_answers(  # noqa: C901
        shared_data: Path, two_fronts: tuple[str, subprocess.Popen[bytes]], client: TestClient, make_tenant: Any,
        make_key: Any) -> None:
    url, _ = two_fronts
    tenant = make_tenant()
    headers = bearer(make_key(tenant["id"])["key"])
    texts = [text for text, _ in sst2_rows(shared_data, 32, seed=3)]
    outcomes: Counter[int] = Counter()
    unavailable: list[httpx.Response] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(worker: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = worker
            while not stop.is_set():
                try:
                    r = http.post(f"{url}/v1/embeddings", json={"model": BASE_MODEL_ID, "input": texts[i % 32]},
                                  headers=headers)
                except httpx.HTTPError as exc:  # a dropped connection is a defect: count it as such
                    r = httpx.Response(599, text=repr(exc))
                with lock:
                    outcomes[r.status_code] += 1
                    if r.status_code == 503:
                        unavailable.append(r)
                if r.status_code == 503:  # as a client should: wait what Retry-After says
                    stop.wait(float(r.headers.get("Retry-After", "1")))
                i += 7

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(12)]
    for t in threads:
        t.start()
    wait_until(lambda: outcomes[200] >= 50, 60, "traffic before the kill")
    old = engine_status(url)["engines"][0]["pid"]
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: outcomes[503] > 0, 10, "503s while the engine is gone")

    def back() -> bool:
        engines = engine_status(url)["engines"]
        if not engines or engines[0]["pid"] == old:
            return False
        probe = _embed(url, headers, "back?")
        with lock:
            outcomes[probe.status_code] += 1
            if probe.status_code == 503:
                unavailable.append(probe)
        return probe.status_code == 200

    wait_until(back, 30, "a new engine serving")
    assert time.monotonic() - killed_at < 30
    served_before = outcomes[200]
    wait_until(lambda: outcomes[200] >= served_before + 30, 30, "traffic after the restart")
    stop.set()
    for t in threads:
        t.join(timeout=60)

    assert set(outcomes) <= {200, 503}, outcomes  # never a 500, never a dropped connection
    for r in unavailable:
        assert r.json()["error"]["code"] == "engine_unavailable", r.text
        assert r.headers["Retry-After"] == "1"
    # Every answered request is billed once; nothing unanswered is.
    assert _ledger_rows(client, tenant["id"]) == outcomes[200]
