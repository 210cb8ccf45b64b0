"""The cost of billing on the request path: authentication, rate limits, quota/budget reservation and the
ledger's group commit, measured in one run.

The same app serves a no-op model (no torch compute) two ways: ``POST /v1/embeddings`` with everything on,
and a bench-only route that tokenizes and goes through the same batcher with no auth and no billing. The
difference of their per-request times is the price of metering. Target: under 1 ms per request.
The ledger is SQLite in a temp dir by default; set MODELMETER_DATABASE_URL / MODELMETER_REDIS_URL to measure
PostgreSQL and Redis.

Tiers: a second tenant with the same budget is on ``scale`` (graduated token tiers), its period already in the
third tier, so every reservation prices all three. The reservation itself (the request path's ``Meter.reserve``
and its release, on the app's quota store: in-process, or the Redis script) is timed for both tenants,
alternated in one run, and the whole metered request too. Target: tiers add no more than 0.1 ms a request.

Credits: a third tenant, also on ``scale`` in its third tier, holds prepaid credits, so every reservation also
draws them (the marginal cost priced twice, the grants read and drawn in the same atomic step). Same target.

    python bench/metering.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx
from _common import ADMIN_TOKEN, bench_settings, p50_ms, run_for
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from modelmeter import clock
from modelmeter.billing.ledger import UsageRecord, record_usage
from modelmeter.billing.quota import Amount
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import Services
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
        from modelmeter.models.text import Encoded

        ids = [[101, *range(len(t.split())), 102] for t in texts]
        return Encoded(ids=ids, tokens=[len(i) for i in ids])

    def forward(self, batch: list[list[int]], tags: Any = None) -> list[list[float]]:
        return [[0.5, 0.5, 0.5, 0.5] for _ in batch]


def install_noop(app: FastAPI) -> None:
    server: ModelServer = app.state.services.engines.server

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


async def make_tenant(client: httpx.AsyncClient, admin: dict[str, str], plan: str) -> tuple[str, dict[str, str]]:
    """A tenant on ``plan`` with a budget (turning the reservation path on) and limits that never refuse."""
    tenant = (await client.post("/admin/tenants", json={"name": plan, "email": f"{plan}@b.co", "plan": plan},
                                headers=admin)).json()
    await client.patch(f"/admin/tenants/{tenant['id']}", headers=admin, json={
        "monthly_budget_cents": 100_000_000, "rpm_limit": 1_000_000, "tpm_limit": 1_000_000_000})
    key = (await client.post(f"/admin/tenants/{tenant['id']}/keys", json={}, headers=admin)).json()["key"]
    return tenant["id"], {"Authorization": f"Bearer {key}"}


def seed_third_tier(services: Services, tenant_id: str, request_id: str = "bench-seed") -> None:
    """1.1 billion tokens this period: past scale's 10M allowance and its first two tiers."""
    with services.sessions() as session:
        record_usage(session=session, records=[UsageRecord(request_id=request_id, tenant_id=tenant_id,
                                                           model_id=MODEL, created=clock.now_s(), plan="scale",
                                                           tokens=1_100_000_000)])
        session.commit()


async def reservation_us(services: Services, tenant_id: str, plan_id: str, n: int, epoch: int = 0) -> float:
    """Microseconds per reservation (``Meter.reserve`` of one request, then its release) for a tenant;
    ``epoch`` > 0: the tenant's credits are drawn (and the release returns them)."""
    plan, amount = services.plans.get(plan_id), Amount(requests=1, tokens=8, cost_micro=0)
    start = time.perf_counter()
    for _ in range(n):
        hold = await services.meter.reserve(tenant_id=tenant_id, plan=plan, budget_cents=100_000_000, amount=amount,
                                            at=clock.now_s(), credits_epoch=epoch)
        assert not epoch or hold.draws, "the credits tenant must draw credits"
        await services.meter.release(hold)
    return (time.perf_counter() - start) / n * 1e6


async def tier_costs(services: Services, client: httpx.AsyncClient, admin: dict[str, str],
                     flat: tuple[str, dict[str, str]], seconds: float) -> dict[str, Any]:
    """The reservation and the whole metered request, flat (payg) against tiered (scale), alternated."""
    tiered = await make_tenant(client, admin, "scale")
    seed_third_tier(services, tiered[0])
    credited = await make_tenant(client, admin, "scale")
    seed_third_tier(services, credited[0], request_id="bench-seed-credits")
    granted = await client.post(f"/admin/tenants/{credited[0]}/credits", json={"amount_cents": 100_000_000},
                                headers=admin)
    assert granted.status_code == 201, granted.text
    body = {"model": MODEL, "input": "a fine and moving film"}
    rounds, n = 3, 2_000
    flat_us, tiered_us, credits_us = [], [], []
    for tenant, plan, epoch in ((flat[0], "payg", 0), (tiered[0], "scale", 0), (credited[0], "scale", 1)):
        await reservation_us(services, tenant, plan, 200, epoch)  # warm: counters initialised, scripts loaded
    for _ in range(rounds):
        flat_us.append(await reservation_us(services, flat[0], "payg", n))
        tiered_us.append(await reservation_us(services, tiered[0], "scale", n))
        credits_us.append(await reservation_us(services, credited[0], "scale", n, epoch=1))
    best_flat, best_tiered, best_credits = min(flat_us), min(tiered_us), min(credits_us)
    results: dict[str, Any] = {"reserve_flat_us": round(best_flat, 1), "reserve_tiered_us": round(best_tiered, 1),
                               "reserve_tiered_credits_us": round(best_credits, 1),
                               "reserve_tiers_added_ms": round((best_tiered - best_flat) / 1000, 4),
                               "reserve_tiers_credits_added_ms": round((best_credits - best_flat) / 1000, 4)}
    print(f"reservation (reserve + release, best of {rounds} x {n}): flat plan {best_flat:.1f} us, "
          f"tiered plan {best_tiered:.1f} us, tiered plan drawing credits {best_credits:.1f} us; tiers add "
          f"{(best_tiered - best_flat) / 1000:.4f} ms, tiers and credits {(best_credits - best_flat) / 1000:.4f} ms")

    def metered(headers: dict[str, str]) -> Any:
        async def call() -> None:
            assert (await client.post("/v1/embeddings", json=body, headers=headers)).status_code == 200
        return call

    for concurrency in (1, 16):
        # Both tenants at once, each from `concurrency` tasks, so the machine's noise falls on both alike: the
        # difference of their median latencies is what tiers add to a request.
        (n_f, lat_f), (n_t, lat_t), (n_c, lat_c) = await asyncio.gather(
            run_for(metered(flat[1]), seconds=seconds * rounds, concurrency=concurrency),
            run_for(metered(tiered[1]), seconds=seconds * rounds, concurrency=concurrency),
            run_for(metered(credited[1]), seconds=seconds * rounds, concurrency=concurrency))
        added, added_c = p50_ms(lat_t) - p50_ms(lat_f), p50_ms(lat_c) - p50_ms(lat_f)
        results.update({f"c{concurrency}_flat_plan_p50_ms": round(p50_ms(lat_f), 3),
                        f"c{concurrency}_tiered_plan_p50_ms": round(p50_ms(lat_t), 3),
                        f"c{concurrency}_tiered_credits_p50_ms": round(p50_ms(lat_c), 3),
                        f"c{concurrency}_tiers_added_ms": round(added, 3),
                        f"c{concurrency}_tiers_credits_added_ms": round(added_c, 3)})
        print(f"concurrency {concurrency:>2} per tenant, side by side: flat plan {n_f / seconds / rounds:6.1f} rps "
              f"(p50 {p50_ms(lat_f):.3f} ms)  tiered {n_t / seconds / rounds:6.1f} rps (p50 {p50_ms(lat_t):.3f} "
              f"ms)  tiered + credits {n_c / seconds / rounds:6.1f} rps (p50 {p50_ms(lat_c):.3f} ms)  tiers add "
              f"{added:.3f} ms/request, tiers and credits {added_c:.3f}")
    return results


async def main(seconds: float) -> dict[str, Any]:
    app = create_app(bench_settings())
    install_noop(app)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    results: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            # A budget turns on the reservation path; high limits keep the bench from being refused.
            flat = await make_tenant(client, admin, "payg")
            auth = flat[1]
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
            results.update(await tier_costs(app.state.services, client, admin, flat, seconds))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    print(json.dumps(asyncio.run(main(parser.parse_args().seconds))))
