"""The fronts' own cost and the batching across them, over real sockets, in one run:

(a) a bare FastAPI route answering the same JSON as ``/v1/embeddings`` (one 384-float vector), same uvicorn
    settings (one process, uvloop + httptools as ``serve`` gets them, no access log);
(b) the metered ``/v1/embeddings`` (auth, limits, reservation, tokenization, the engine hop, ledger, metrics) with
    one input, through ``serve --workers 1 --engine process`` and ``serve --workers 2`` on a simulated device
    (``MODELMETER_SIMULATED_DEVICE=batch_ms=1,row_us=2``: the engine waits as a GPU would compute);
(c) optionally (``--profile``) py-spy samples of one saturated front, attributed to the request path's stages.

One load client: ``wrk`` (a C load generator: apt-get install wrk), one connection per client. Targets: the metered
route >= 0.5x the bare route's requests/s per front; mean rows per batch at 64 clients over 2 fronts >= 2x that of
one front at 32 clients. Runs on PostgreSQL + Redis when MODELMETER_DATABASE_URL / MODELMETER_REDIS_URL are set
(``--workers 2`` needs Redis), else SQLite and in-process limits for one front.

    python bench/fronts.py [--seconds 10] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ADMIN_TOKEN = "mmadmin_bench-fronts-0123456789abcdef0123"
SIMULATED = "batch_ms=1,row_us=2"
MODEL = "all-MiniLM-L6-v2"
TEXT = "a gripping, funny and ultimately heartbreaking film"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BARE_APP = textwrap.dedent('''
    import json, sys, uvicorn
    from fastapi import FastAPI, Request, Response
    app = FastAPI()
    BODY = json.dumps({"object": "list", "model": "all-MiniLM-L6-v2",
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.05103] * 384}],
                       "usage": {"prompt_tokens": 12, "total_tokens": 12}}).encode()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        await request.json()
        return Response(BODY, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning")
''')


def _wait_ready(url: str, process: subprocess.Popen[bytes], path: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


@contextmanager
def _process(command: list[str], env: dict[str, str], url: str, ready_path: str) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.NamedTemporaryFile(prefix="mm-fronts-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, process, ready_path)
        yield process
    except Exception:
        print(Path(log.name).read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wrk(url: str, *, key: str | None, clients: int, seconds: float) -> tuple[float, int]:
    """Requests/s and non-2xx count from one wrk run (one thread: one load client)."""
    body = json.dumps({"model": MODEL, "input": TEXT})
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    script = "wrk.method = 'POST'\nwrk.body = " + json.dumps(body) + "\n" + "".join(
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "-s", f.name, f"{url}/v1/embeddings"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, int(bad.group(1)) if bad else 0


REAL_DEVICE = False  # --real: the engine computes on its device instead of waiting (bench/device.sh on a GPU)


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMETER_")}
    for name in ("MODELMETER_DATABASE_URL", "MODELMETER_REDIS_URL"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update({"MODELMETER_DATA_DIR": str(data_dir), "MODELMETER_ADMIN_TOKEN": ADMIN_TOKEN,
                "MODELMETER_LOG_LEVEL": "warning", **extra})
    if not REAL_DEVICE:
        env["MODELMETER_SIMULATED_DEVICE"] = SIMULATED
    return env


def _tenant_key(url: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    tenant = httpx.post(f"{url}/admin/tenants", json={"name": "bench", "email": "b@b.co", "plan": "pro"},
                        headers=admin).json()
    # The plan's rate limits would refuse a benchmark's load: lift them for this tenant (the API's maxima).
    httpx.patch(f"{url}/admin/tenants/{tenant['id']}", headers=admin,
                json={"rpm_limit": 1_000_000, "tpm_limit": 1_000_000_000}).raise_for_status()
    key: str = httpx.post(f"{url}/admin/tenants/{tenant['id']}/keys", json={}, headers=admin).json()["key"]
    return key


def _engine(url: str) -> dict[str, Any]:
    status: dict[str, Any] = httpx.get(f"{url}/admin/engine", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                       timeout=10).json()
    return status


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _pids_named(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def bare(seconds: float, clients: int) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _process([sys.executable, "-c", BARE_APP, str(port)], dict(os.environ), url, "/docs"):
        wrk(url, key=None, clients=clients, seconds=1)  # warm-up
        rps, bad = wrk(url, key=None, clients=clients, seconds=seconds)
    assert bad == 0
    return rps


def metered(workers: int, client_counts: list[int], seconds: float, profile: Path | None = None,
            engine: str = "process") -> dict[int, dict[str, float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix="mm-fronts-data-"))
    command = [sys.executable, "-m", "modelmeter.cli", "serve", "--workers", str(workers), "--engine", engine,
               "--no-worker", "--port", str(port)]
    results: dict[int, dict[str, float]] = {}
    try:
        with _process(command, _env(data_dir), url, "/readyz"):
            key = _tenant_key(url)
            wrk(url, key=key, clients=max(client_counts), seconds=2)  # warm-up: caches, connections, JIT-free paths
            for clients in client_counts:
                status = _engine(url)
                before = status["engines"][0]
                front_pids = [f["pid"] for f in status["fronts"]]
                groups = {"fronts": front_pids, "engine": [p for p in [before["pid"]] if p not in front_pids],
                          "postgres": _pids_named("postgres:"), "redis": _pids_named("redis-server")}
                cpu_before = {name: _cpu_s(pids) for name, pids in groups.items()}
                rps, bad = wrk(url, key=key, clients=clients, seconds=seconds)
                cpu = {name: _cpu_s(pids) - cpu_before[name] for name, pids in groups.items()}
                after = _engine(url)["engines"][0]
                batches = after["batches"] - before["batches"]
                rows = after["rows"] - before["rows"]
                served = rps * seconds
                results[clients] = {"rps": rps, "non_2xx": bad, "rows_per_batch": rows / max(1, batches),
                                    "mixed_share": (after["mixed_batches"] - before["mixed_batches"]) / max(1, batches),
                                    **{f"cpu_us_per_request_{name}": round(1e6 * v / max(1, served), 1)
                                       for name, v in cpu.items()}}
            if profile is not None:
                results[-1] = _profile(url, key, profile, seconds)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return results


# Stages of the front's request path, by the functions that do them: a sample belongs to the innermost frame that
# names a stage; samples under no stage are the HTTP server, the event loop, or the framework (FastAPI/Starlette
# routing and our middlewares) by their leaf.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("auth", ("gateway/auth.py", "tenancy/keys.py", "current_principal")),
    ("limits", ("ratelimit.py",)),
    ("reservation", ("quota.py", "Meter.reserve", "credits.py")),
    ("tokenization", ("models/text.py",)),
    ("ipc", ("engine/client.py", "engine/protocol.py", "zmq/")),
    ("ledger hand-off", ("metering.py", "sqlalchemy", "psycopg")),
    ("metrics", ("telemetry.py", "prometheus_client", "_observe")),
    ("validation", ("pydantic", "fastapi/dependencies/", "fastapi/_compat")),
    ("response", ("routes/inference.py", "responses.py", "orjson")),
    ("fast lane (gate, decode, send)", ("gateway/fastlane.py",)),
    ("pipeline glue", ("gateway/inference.py",)),
]
FALLBACK: list[tuple[str, tuple[str, ...]]] = [
    ("http server", ("uvicorn", "httptools", "h11")),
    ("framework (routing, middleware)", ("starlette", "fastapi", "gateway/middleware.py", "gateway/idempotency.py")),
    ("event loop", ("asyncio", "uvloop", "selectors")),
]


def _stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in STAGES:
            if any(needle in frame for needle in needles):
                return name
    leaf = frames[-1] if frames else ""
    return next((name for name, needles in FALLBACK if any(n in leaf for n in needles)), "other")


def _profile(url: str, key: str, out: Path, seconds: float) -> dict[str, float]:
    """py-spy samples of one front under load: microseconds per request by stage (the front saturated)."""
    fronts = [f["pid"] for f in _engine(url)["fronts"]]
    raw = out / "front.txt"
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    spy = subprocess.Popen([py_spy, "record", "-p", str(fronts[0]), "-d", f"{seconds:g}", "-r", "500",
                            "-f", "raw", "-o", str(raw), "--nonblocking", "--gil"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rps, _ = wrk(url, key=key, clients=32, seconds=seconds)
    spy.wait()
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        samples = int(n)
        total += samples
        stage = _stage_of(stack.split(";"))
        counts[stage] = counts.get(stage, 0) + samples
    # A saturated front spends 1/rps seconds of one core per request (the sampler sees only this front).
    per_request_us = 1e6 / rps
    return {stage: per_request_us * n / max(1, total) for stage, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def main(seconds: float, profile: bool) -> dict[str, Any]:
    bare_rps = bare(seconds, 32)
    scratch = Path(tempfile.mkdtemp(prefix="mm-fronts-prof-")) if profile else None
    one = metered(1, [32], seconds, scratch)
    inprocess = metered(1, [32], seconds, engine="inprocess")
    two = metered(2, [64], seconds) if os.environ.get("MODELMETER_REDIS_URL") else {}
    report: dict[str, Any] = {"bare_rps": round(bare_rps, 1), "one_front": one[32]}
    report["metered_over_bare_per_front"] = round(one[32]["rps"] / bare_rps, 3)
    report["one_front_inprocess_engine"] = inprocess[32]
    report["inprocess_over_engine_process"] = round(inprocess[32]["rps"] / one[32]["rps"], 3)
    if two:
        report["two_fronts"] = two[64]
        report["two_fronts_per_front_over_bare"] = round(two[64]["rps"] / 2 / bare_rps, 3)
        report["rows_per_batch_2x64_over_1x32"] = round(two[64]["rows_per_batch"] / one[32]["rows_per_batch"], 2)
    if profile:
        report["stage_us_per_request"] = {k: round(v, 1) for k, v in one[-1].items()}
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--profile", action="store_true", help="py-spy the front (pip install py-spy)")
    parser.add_argument("--real", action="store_true", help="compute on the engine's device (no simulation)")
    args = parser.parse_args()
    REAL_DEVICE = args.real
    print(json.dumps(main(args.seconds, args.profile), indent=2))
