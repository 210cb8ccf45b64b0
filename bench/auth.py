"""Cost of authentication: authenticated ``GET /v1/models`` against unauthenticated ``GET /healthz``.

Both are driven in one run, in-process through the ASGI interface (no sockets, so the client does not steal
the server's cores), sequentially and at concurrency 16. The per-request cost of authentication (and the
model-list query behind it) is ``1/rps(models) - 1/rps(healthz)``.

    python bench/auth.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
from _common import ADMIN_TOKEN, bench_settings, p50_ms, run_for

from modelmeter.gateway.app import create_app


async def main(seconds: float) -> dict[str, float]:
    app = create_app(bench_settings())
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    results: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            tenant = (await client.post("/admin/tenants", json={"name": "b", "email": "b@b.co", "plan": "pro"},
                                        headers=admin)).json()
            key = (await client.post(f"/admin/tenants/{tenant['id']}/keys", json={}, headers=admin)).json()["key"]
            auth = {"Authorization": f"Bearer {key}"}

            async def health() -> None:
                assert (await client.get("/healthz")).status_code == 200

            async def models() -> None:
                assert (await client.get("/v1/models", headers=auth)).status_code == 200

            await run_for(models, seconds=0.5, concurrency=4)  # warm caches and pools
            for concurrency in (1, 16):
                n_h, lat_h = await run_for(health, seconds=seconds, concurrency=concurrency)
                n_m, lat_m = await run_for(models, seconds=seconds, concurrency=concurrency)
                rps_h, rps_m = n_h / seconds, n_m / seconds
                cost_ms = (1 / rps_m - 1 / rps_h) * 1000
                results[f"c{concurrency}_healthz_rps"] = round(rps_h, 1)
                results[f"c{concurrency}_models_rps"] = round(rps_m, 1)
                results[f"c{concurrency}_ratio"] = round(rps_m / rps_h, 3)
                results[f"c{concurrency}_auth_cost_ms"] = round(cost_ms, 3)
                print(f"concurrency {concurrency:>2}: /healthz {rps_h:8.1f} rps (p50 {p50_ms(lat_h):.2f} ms)  "
                      f"/v1/models {rps_m:8.1f} rps (p50 {p50_ms(lat_m):.2f} ms)  ratio {rps_m / rps_h:.3f}  "
                      f"authenticated cost {cost_ms:.3f} ms/request")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    print(json.dumps(asyncio.run(main(parser.parse_args().seconds))))
