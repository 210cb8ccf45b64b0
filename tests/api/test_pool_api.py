"""The model pool behind the API: eviction under a small memory budget, reload on next use."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import Services, services_of
from modelmeter.settings import Settings
from tests.conftest import bearer


def test_eviction_under_small_budget(settings: Settings, client: TestClient, make_tenant: Any, make_key: Any,
                                     register_model: Any) -> None:
    tenant = make_tenant()
    key = make_key(tenant["id"])["key"]
    first, second = register_model(tenant["id"]), register_model(tenant["id"])
    small = settings.model_copy(update={"pool_memory_mb": 5})  # one tiny BERT (~4 MB) fits, two do not
    with TestClient(create_app(small)) as http:
        pool = services_of(http.app).engines.server.pool
        for model in (first, second, first):
            response = http.post("/v1/classify", json={"model": model, "input": "x"}, headers=bearer(key))
            assert response.status_code == 200, response.text
            assert pool.loaded() == [model]
            assert pool.used_bytes <= 5 * 1024 * 1024
        assert (pool.load_count, pool.eviction_count) == (3, 2)


def test_a_stale_model_snapshot_is_reloaded_once_under_concurrency(settings: Settings, client: TestClient,
                                                                   services: Services) -> None:
    import asyncio

    from modelmeter.models.registry import ModelCache

    cache = ModelCache(services.sessions, ttl_s=60)
    reloads: list[int] = []
    original = cache.refresh
    cache.refresh = lambda: (reloads.append(1), original())[1]  # type: ignore[method-assign]

    async def many() -> None:
        await asyncio.gather(*(cache.visible("ten_x") for _ in range(32)))

    asyncio.run(many())
    assert reloads == [1]
