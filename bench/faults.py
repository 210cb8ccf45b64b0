"""Redis and PostgreSQL outages under load, through a real gateway: what clients get, how fast, and the ledger.

A TCP proxy (tests/faultproxy.py) sits between the gateway and each dependency; for each of Redis and PostgreSQL
in turn: steady load, then the proxy resets every connection and refuses new ones for ``--outage`` seconds (or,
as "blackhole", drops every packet with iptables and resets nothing: a partition or a frozen host; needs root),
then the dependency is back. Eight client threads send ``/v1/embeddings`` with one sentence (the packaged base model,
in-process engine). Prints, per outage: answers 200 and 503 during it, anything else (500s, dropped connections:
the target is none), the 503s' latency (target: within 2 s), seconds from restore to the first 200, and whether the
ledger holds exactly one row per 200 answered.

    MODELMETER_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
    MODELMETER_REDIS_URL=redis://127.0.0.1:6379/0 python bench/faults.py [--outage 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.faultproxy import FaultProxy, can_blackhole  # the tests' harness (run from the repository root)

from modelmeter import db
from modelmeter.gateway.app import create_app
from modelmeter.settings import Settings

ADMIN_TOKEN = "mmadmin_bench-faults-0123456789abcdef0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _host_port(url: str, default: int) -> tuple[str, int]:
    rest = url.split("@", 1)[-1].split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.partition(":")
    return host, int(port or default)


def main(outage_s: float, clients: int) -> dict[str, Any]:
    pg_url, redis_url = os.environ["MODELMETER_DATABASE_URL"], os.environ["MODELMETER_REDIS_URL"]
    engine = db.make_engine(pg_url)
    db.upgrade(engine)
    pg, rd = FaultProxy(*_host_port(pg_url, 5432)), FaultProxy(*_host_port(redis_url, 6379))
    pg_host = "{}:{}".format(*_host_port(pg_url, 5432))
    redis_host = redis_url.split("://", 1)[1].split("/", 1)[0]
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="mm-faults-")), admin_token=ADMIN_TOKEN,
                        database_url=pg_url.replace(pg_host, f"127.0.0.1:{pg.port}", 1),
                        redis_url=redis_url.replace(redis_host, f"127.0.0.1:{rd.port}", 1), start_worker=False,
                        _env_file=None)  # type: ignore[call-arg]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="critical",
                                           access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    report: dict[str, Any] = {}
    try:
        for fault in ("reset", "blackhole") if can_blackhole() else ("reset",):
            for name, proxy in (("redis", rd), ("postgres", pg)):
                report[f"{name} {fault}"] = _outage(url, engine, proxy, outage_s, clients, fault == "blackhole")
    finally:
        server.should_exit = True
        pg.close()
        rd.close()
    return report


def _outage(url: str, engine: Any, proxy: FaultProxy, outage_s: float, clients: int,
            blackhole: bool) -> dict[str, Any]:
    tenant = httpx.post(f"{url}/admin/tenants", json={"name": "F", "email": "f@example.com", "plan": "payg"},
                        headers=ADMIN, timeout=60).json()["id"]
    httpx.patch(f"{url}/admin/tenants/{tenant}", json={"rpm_limit": 1_000_000, "tpm_limit": 1_000_000_000},
                headers=ADMIN, timeout=60)
    key = httpx.post(f"{url}/admin/tenants/{tenant}/keys", json={}, headers=ADMIN, timeout=60).json()["key"]
    answers: list[tuple[float, int, float, str | None]] = []  # (sent at, status, seconds, request id)
    dropped: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "a fine film"},
                                  headers={"Authorization": f"Bearer {key}"})
                except httpx.HTTPError as exc:
                    dropped.append(type(exc).__name__)
                    continue
                answers.append((started, r.status_code, time.monotonic() - started, r.headers.get("x-request-id")))

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3)
    cut_at = time.monotonic()
    proxy.blackhole() if blackhole else proxy.cut()
    time.sleep(outage_s)
    restored_at = time.monotonic()
    proxy.restore()
    while not any(a[0] >= restored_at and a[1] == 200 for a in answers) and time.monotonic() - restored_at < 60:
        time.sleep(0.01)
    first_ok = min((a[0] + a[2] for a in answers if a[0] >= restored_at and a[1] == 200), default=float("nan"))
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    during = [a for a in answers if cut_at <= a[0] < restored_at]
    refused = [a[2] for a in answers if a[1] == 503]
    with engine.connect() as conn:
        rows = {r[0] for r in conn.execute(text("SELECT request_id FROM usage_event WHERE tenant_id = :t"),
                                            {"t": tenant})}
    served = {a[3] for a in answers if a[1] == 200}
    return {
        "outage_s": outage_s,
        "during_outage": {"200": sum(a[1] == 200 for a in during), "503": sum(a[1] == 503 for a in during),
                          "other": sum(a[1] not in (200, 503) for a in during)},
        "other_statuses_whole_run": sorted({a[1] for a in answers} - {200, 503}),
        "dropped_connections": len(dropped),
        "503_latency_s": {"p50": round(statistics.median(refused), 3) if refused else None,
                          "max": round(max(refused), 3) if refused else None},
        "seconds_from_restore_to_first_200": round(first_ok - restored_at, 3),
        "answered_200": len(served),
        "ledger_rows": len(rows),
        "ledger_equals_answered": rows == served,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(main(args.outage, args.clients), indent=2))
