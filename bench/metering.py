"""The cost of billing on the request path: authentication, rate limits, quota/budget reservation and the
ledger's group commit, measured in one run.

The same app serves a no-op model (no torch compute) two ways: ``POST /v1/embeddings`` with everything on,
and a bench-only route that tokenizes and goes through the same batcher with no auth and no billing. The
difference of their per-request times is the price of metering. Target: under 1 ms per request.
The ledger is SQLite in a temp dir by default; set MODELMETER_DATABASE_URL / MODELMETER_REDIS_URL to measure
PostgreSQL and Redis.

    python bench/metering.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx
from _common import ADMIN_TOKEN, bench_settings, p50_ms, run_for
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from modelmeter.gateway.app import create_app
from modelmeter.models.pool import ModelPool
from modelmeter.models.serving import ModelServer, ModelSource, SharedBase

MODEL = "all-MiniLM-L6-v2"


class NoopBackend:
    """Tokenizes like a model would (one id per word) and returns a constant vector: no compute."""

    task = "feature-extraction"
    dimensions = 4
    memory_bytes = 1
    max_length = 512

    class device:
        type = "cpu"

    def tokenize(self, texts: list[str], *, truncate: bool) -> Any:
        from modelmeter.models.backends import Encoded

        ids = [[101, *range(len(t.split())), 102] for t in texts]
        return Encoded(ids=ids, tokens=[len(i) for i in ids])

    def forward(self, batch: list[list[int]], tags: Any = None) -> list[list[float]]:
        return [[0.5, 0.5, 0.5, 0.5] for _ in batch]


def install_noop(app: FastAPI) -> None:
    server: ModelServer = app.state.services.server

    def load(model_id: str) -> SharedBase:
        from modelmeter.models.batching import Batcher

        backend = NoopBackend()
        caps = server._caps
        batcher: Batcher[Any] = Batcher(backend.forward, max_batch_tokens=caps.max_batch_tokens,
                                        max_batch_size=caps.max_batch_size, max_wait_ms=caps.max_wait_ms,
                                        max_queue=caps.max_queue, name="noop")
        adapters: ModelPool[Any] = ModelPool(lambda _: None, 1)  # type: ignore[arg-type,return-value]
        return SharedBase(model_id, backend, batcher, adapters, {})  # type: ignore[arg-type]

    server.bases._loader = load  # type: ignore[assignment]

    @app.post("/bench/unmetered")
    async def unmetered(request: Request) -> JSONResponse:
        body = await request.json()
        from modelmeter.models.registry import artifact_path

        info = await app.state.services.models.get("", MODEL)
        path = artifact_path(info.artifact, app.state.services.settings.data_dir)
        async with server.use(ModelSource(MODEL, path, info.task)) as model:
            encoded = model.backend.tokenize([body["input"]], truncate=False)
            submission = await model.batcher.submit(encoded.ids)
        return JSONResponse({"object": "list", "data": [{"object": "embedding", "index": 0,
                                                         "embedding": submission.results[0]}]})


async def main(seconds: float) -> dict[str, Any]:
    app = create_app(bench_settings())
    install_noop(app)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    results: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            tenant = (await client.post("/admin/tenants", json={"name": "b", "email": "b@b.co", "plan": "payg"},
                                        headers=admin)).json()
            # A budget turns on the reservation path; high limits keep the bench from being refused.
            await client.patch(f"/admin/tenants/{tenant['id']}", headers=admin, json={
                "monthly_budget_cents": 100_000_000, "rpm_limit": 1_000_000, "tpm_limit": 1_000_000_000})
            key = (await client.post(f"/admin/tenants/{tenant['id']}/keys", json={}, headers=admin)).json()["key"]
            auth = {"Authorization": f"Bearer {key}"}
            body = {"model": MODEL, "input": "a fine and moving film"}

            async def metered() -> None:
                assert (await client.post("/v1/embeddings", json=body, headers=auth)).status_code == 200

            async def unmetered() -> None:
                assert (await client.post("/bench/unmetered", json=body)).status_code == 200

            await run_for(metered, seconds=0.5, concurrency=4)
            await run_for(unmetered, seconds=0.5, concurrency=4)
            for concurrency in (1, 16):
                n_u, lat_u = await run_for(unmetered, seconds=seconds, concurrency=concurrency)
                n_m, lat_m = await run_for(metered, seconds=seconds, concurrency=concurrency)
                rps_u, rps_m = n_u / seconds, n_m / seconds
                cost = (1 / rps_m - 1 / rps_u) * 1000
                results.update({f"c{concurrency}_unmetered_rps": round(rps_u, 1),
                                f"c{concurrency}_metered_rps": round(rps_m, 1),
                                f"c{concurrency}_ratio": round(rps_m / rps_u, 3),
                                f"c{concurrency}_metering_ms": round(cost, 3)})
                print(f"concurrency {concurrency:>2}: without billing {rps_u:7.1f} rps (p50 {p50_ms(lat_u):.2f} ms)"
                      f"  with auth+limits+reservation+ledger {rps_m:7.1f} rps (p50 {p50_ms(lat_m):.2f} ms)"
                      f"  ratio {rps_m / rps_u:.3f}  cost {cost:.3f} ms/request")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    print(json.dumps(asyncio.run(main(parser.parse_args().seconds))))
