"""PostgreSQL or Redis cut under concurrent load (product.md, Round 3): every request is answered 200 or 503
``service_unavailable`` with ``Retry-After`` (no 500, no dropped connection), service comes back by itself when the
dependency does, and the ledger holds exactly one row per 200 answered.

Real connections through tests/faultproxy.py (a TCP proxy that resets every connection and refuses new ones while
cut), a real uvicorn on a loopback port, four client threads. Runs on PostgreSQL + Redis only (CI's first pass)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from modelmeter import clock, db
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import services_of
from modelmeter.settings import Settings
from tests.conftest import ADMIN, ON_POSTGRES, PG_URL, REDIS_URL, bearer
from tests.faultproxy import FaultProxy, can_blackhole
from tests.processes import wait_until
from tests.support.live_server import serve_in_thread

pytestmark = pytest.mark.skipif(not (ON_POSTGRES and REDIS_URL), reason="needs PostgreSQL and Redis")

OUTAGE_S = 3.0


@dataclass
class Answer:
    status: int
    code: str | None
    retry_after: str | None
    request_id: str | None
    seconds: float
    at: float


def _host_port(url: str, default: int) -> tuple[str, int]:
    rest = url.split("@", 1)[-1].split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.partition(":")
    return host, int(port or default)


@pytest.fixture
def proxies() -> Iterator[tuple[FaultProxy, FaultProxy]]:
    pg = FaultProxy(*_host_port(PG_URL, 5432))
    rd = FaultProxy(*_host_port(REDIS_URL, 6379))
    yield pg, rd
    pg.close()
    rd.close()


@pytest.fixture
def gateway(settings: Settings, database_url: str, proxies: tuple[FaultProxy, FaultProxy],
            tmp_path: Path) -> Iterator[tuple[str, Any]]:
    pg, rd = proxies
    host, port = _host_port(PG_URL, 5432)
    proxied = settings.model_copy(update={
        "database_url": PG_URL.replace(f"{host}:{port}", f"127.0.0.1:{pg.port}", 1),
        "redis_url": REDIS_URL.replace(REDIS_URL.split("://", 1)[1].split("/", 1)[0], f"127.0.0.1:{rd.port}", 1),
    })
    with serve_in_thread(create_app(proxied), lifespan="auto") as server:
        yield server.url, server.app


def _model(app: Any, tenant_id: str) -> str:
    from modelmeter.models.registry import MlModel
    from tests.tiny_bert import make_tiny_bert

    services = services_of(app)
    relative = Path("models") / tenant_id / "tiny"
    make_tiny_bert(services.settings.data_dir / relative, "text-classification", ["neg", "pos"])
    with services.sessions() as session:
        session.add(MlModel(id="tiny-faults", owner_tenant_id=tenant_id, base_model="tiny-bert",
                            task="text-classification", labels_json=json.dumps(["neg", "pos"]),
                            artifact=str(relative), created=clock.now_s()))
        session.commit()
    services.models.invalidate()
    return "tiny-faults"


def _load(url: str, key: str, path: str, model: str, stop: threading.Event, answers: list[Answer],
          failures: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = http.post(path, json={"model": model, "input": "a fine film"}, headers=bearer(key))
            except httpx.HTTPError as exc:  # a dropped connection: what must never happen
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            body = response.json()
            answers.append(Answer(response.status_code, body.get("error", {}).get("code") if response.status_code
                                  != 200 else None, response.headers.get("retry-after"),
                                  response.headers.get("x-request-id"), time.monotonic() - started, started))


def _through_an_outage(url: str, key: str, path: str, model: str, proxy: FaultProxy,
                       blackhole: bool = False) -> tuple[list[Answer], list[str]]:
    """Four clients load ``path`` through steady service, an outage of ``proxy``'s dependency (connections reset,
    or with ``blackhole`` packets dropped) and the recovery; returns every answer and every dropped connection."""
    answers: list[Answer] = []
    failures: list[str] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_load, args=(url, key, path, model, stop, answers, failures))
               for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: sum(a.status == 200 for a in answers) >= 20, 60, "service before the outage")
        cut_at = time.monotonic()
        proxy.blackhole() if blackhole else proxy.cut()
        wait_until(lambda: any(a.status == 503 and a.at >= cut_at for a in answers), 30, "a 503 in the outage")
        time.sleep(OUTAGE_S)
        restored_at = time.monotonic()
        proxy.restore()
        wait_until(lambda: sum(a.status == 200 and a.at >= restored_at for a in answers) >= 20, 30,
                   "service after the outage")
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
    return answers, failures


def _ledger_ids() -> set[str]:
    engine = db.make_engine(PG_URL)  # straight to the server, not through the proxy
    with engine.connect() as conn:
        ids = {r[0] for r in conn.execute(text("SELECT request_id FROM usage_event"))}
    engine.dispose()
    return ids


@pytest.mark.parametrize("fault", ["reset", "blackhole"])
@pytest.mark.parametrize("dependency", ["redis", "postgres"])
def test_an_outage_is_answered_503_and_service_comes_back(
        gateway: tuple[str, Any], proxies: tuple[FaultProxy, FaultProxy], dependency: str, fault: str) -> None:
    """Reset: the server died or the network reset. Blackhole: packets dropped, nothing reset (a partition, a
    frozen host), where only our own timeouts (redis_clients, db.PG_FAIL_FAST) stop a request waiting on TCP."""
    if fault == "blackhole" and not can_blackhole():
        if os.environ.get("CI"):
            pytest.fail("CI needs root and iptables for the blackhole faults (.ci/run installs iptables)")
        pytest.skip("needs root and iptables")
    url, app = gateway
    pg, rd = proxies
    proxy = rd if dependency == "redis" else pg
    tenant = httpx.post(f"{url}/admin/tenants", json={"name": "Faulty", "email": "f@example.com", "plan": "payg"},
                        headers=ADMIN, timeout=30).json()["id"]
    limits = {"rpm_limit": 1_000_000, "tpm_limit": 100_000_000}  # the load is not what is refused here
    assert httpx.patch(f"{url}/admin/tenants/{tenant}", json=limits, headers=ADMIN, timeout=30).status_code == 200
    key = httpx.post(f"{url}/admin/tenants/{tenant}/keys", json={}, headers=ADMIN, timeout=30).json()["key"]
    model = _model(app, tenant)
    answers, failures = _through_an_outage(url, key, "/v1/classify", model, proxy, blackhole=fault == "blackhole")
    assert failures == []
    assert {a.status for a in answers} == {200, 503}
    refused = [a for a in answers if a.status == 503]
    assert {a.code for a in refused} == {"service_unavailable"}
    assert {a.retry_after for a in refused} == {"1"}
    assert max(a.seconds for a in refused) < 10  # answered, not hung (the 2 s figure is bench/faults.py's)
    served = {a.request_id for a in answers if a.status == 200}
    assert len(served) == sum(a.status == 200 for a in answers)
    assert _ledger_ids() == served  # one row per 200 answered, none for a 503


@pytest.mark.slow  # an engine process loads the packaged base model
@pytest.mark.parametrize("dependency", ["redis", "postgres"])
def test_an_outage_through_two_fronts_and_an_engine_process(
        settings: Settings, database_url: str, proxies: tuple[FaultProxy, FaultProxy], tmp_path: Path,
        dependency: str) -> None:
    """The same outage through ``serve --workers 2`` (two torch-free fronts, one engine process)."""
    from tests.support.gateways import two_fronts

    pg, rd = proxies
    host, port = _host_port(PG_URL, 5432)
    proxied_pg = PG_URL.replace(f"{host}:{port}", f"127.0.0.1:{pg.port}", 1)
    proxied_redis = REDIS_URL.replace(REDIS_URL.split("://", 1)[1].split("/", 1)[0], f"127.0.0.1:{rd.port}", 1)
    proxied = settings.model_copy(update={"database_url": proxied_pg, "redis_url": proxied_redis})
    with two_fronts(proxied, tmp_path, MODELMETER_TORCH_THREADS="1") as fronts:
        url = fronts.url
        tenant = httpx.post(f"{url}/admin/tenants", json={"name": "F", "email": "f@example.com", "plan": "payg"},
                            headers=ADMIN, timeout=30).json()["id"]
        httpx.patch(f"{url}/admin/tenants/{tenant}", json={"rpm_limit": 1_000_000, "tpm_limit": 100_000_000},
                    headers=ADMIN, timeout=30)
        key = httpx.post(f"{url}/admin/tenants/{tenant}/keys", json={}, headers=ADMIN, timeout=30).json()["key"]
        answers, failures = _through_an_outage(url, key, "/v1/embeddings", "all-MiniLM-L6-v2",
                                               rd if dependency == "redis" else pg)
    assert failures == []
    assert {a.status for a in answers} == {200, 503}
    assert {a.code for a in answers if a.status == 503} == {"service_unavailable"}
    served = {a.request_id for a in answers if a.status == 200}
    assert _ledger_ids() == served
