"""Tenants' LoRA adapters through the HTTP API (tiny random BERTs): one batch across tenants, each tenant its own
labels, a corrupt adapter failing for its tenant only, compute attributed by tokens, telemetry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlmodel import select

from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import Services, services_of
from modelmeter.models.adapters.artifact import ADAPTER_WEIGHTS
from modelmeter.models.registry import MlModel
from tests.conftest import ADMIN, assert_envelope, bearer

pytestmark = pytest.mark.anyio
TEXTS = ["a fine film", "the worst, most tedious two hours I have spent in a cinema this year", "ok", "fine " * 40]



@pytest.fixture
def tenants(make_tenant: Any, make_key: Any) -> list[tuple[str, dict[str, str]]]:
    made = [make_tenant() for _ in range(3)]
    return [(t["id"], bearer(make_key(t["id"])["key"])) for t in made]


def _ledger(client: TestClient) -> list[UsageEvent]:
    services = services_of(client.app)
    with services.sessions() as session:
        return list(session.exec(select(UsageEvent).where(UsageEvent.kind == "inference")).all())


async def _drive(client: TestClient, calls: list[tuple[str, dict[str, Any], dict[str, str]]],
                 registry: CollectorRegistry | None = None) -> tuple[list[httpx.Response], Any]:
    """Send every call at once through a fresh app on the same database (so that they share batches)."""
    app = create_app(services_of(client.app).settings, registry=registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            responses = await asyncio.gather(*(http.post(path, json=body, headers=h) for path, body, h in calls))
            metrics = (await http.get("/metrics", headers=ADMIN)).text
    return list(responses), (app, metrics)


async def test_tenants_share_a_batch_and_each_gets_its_own_labels(
    client: TestClient, tenants: Any, register_adapter: Callable[..., str]
) -> None:
    (t1, h1), (t2, h2), (_, h3) = tenants
    sentiment = register_adapter(t1, labels=["negative", "positive"])
    topics = register_adapter(t2, labels=["sports", "politics", "science"], rank=8)
    calls = [("/v1/classify", {"model": sentiment, "input": t}, h1) for t in TEXTS]
    calls += [("/v1/classify", {"model": topics, "input": t}, h2) for t in TEXTS]
    calls += [("/v1/embeddings", {"model": "tiny-base", "input": t}, h3) for t in TEXTS]
    registry = CollectorRegistry()
    responses, (app, _) = await _drive(client, calls * 4, registry)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for (_, body, _), response in zip(calls * 4, responses, strict=True):
        if body["model"] == sentiment:
            assert set(response.json()["data"][0]["scores"]) == {"negative", "positive"}
        elif body["model"] == topics:
            assert set(response.json()["data"][0]["scores"]) == {"sports", "politics", "science"}
        else:
            assert len(response.json()["data"][0]["embedding"]) == 32
    server = services_of(app).engines.server
    assert server.bases.loaded() == ["tiny-base"]
    assert server.pool.loaded() == []
    # The batches really mixed tenants: some batch held rows of both adapters.
    mixed = registry.get_sample_value("modelmeter_batch_adapters_bucket", {"model": "tiny-base", "le": "1.0"})
    total = registry.get_sample_value("modelmeter_batch_adapters_count", {"model": "tiny-base"})
    assert total is not None
    assert mixed is not None
    assert total > mixed
    assert registry.get_sample_value("modelmeter_adapter_loads_total", {"model": "tiny-base"}) == 2
    assert registry.get_sample_value("modelmeter_adapters_resident", {"model": "tiny-base"}) == 2


async def test_compute_in_mixed_batches_is_attributed_by_tokens(
    client: TestClient, tenants: Any, register_adapter: Callable[..., str]
) -> None:
    """Each request's compute_us is its tokens' share of its batches: the ledger sums to the forward time."""
    (t1, h1), (t2, h2), _ = tenants
    models = [register_adapter(t1), register_adapter(t2, labels=["a", "b", "c"])]
    calls = [("/v1/classify", {"model": models[i % 2], "input": TEXTS[i % 4]}, (h1, h2)[i % 2]) for i in range(48)]
    registry = CollectorRegistry()
    responses, _ = await _drive(client, calls, registry)
    assert all(r.status_code == 200 for r in responses)
    rows = _ledger(client)
    assert len(rows) == 48
    forward_s = registry.get_sample_value("modelmeter_batch_forward_seconds_sum", {"model": "tiny-base"})
    assert forward_s is not None
    # Each row's share is truncated to whole microseconds: the sum is short by less than 1 µs per row.
    assert 0 <= forward_s * 1e6 - sum(r.compute_us for r in rows) < len(rows) + 1
    by_tenant = {t: sum(r.tokens for r in rows if r.tenant_id == t) for t in (t1, t2)}
    assert all(by_tenant.values())


async def test_a_corrupt_adapter_fails_its_tenant_only(
    client: TestClient, tenants: Any, register_adapter: Callable[..., str]
, services: Services) -> None:
    (t1, h1), (t2, h2), _ = tenants
    good, bad = register_adapter(t1), register_adapter(t2)
    with services.sessions() as session:
        row = session.get(MlModel, bad)
        assert row is not None
    (services.settings.data_dir / row.artifact / ADAPTER_WEIGHTS).write_bytes(b"\x00corrupt")
    calls = [("/v1/classify", {"model": good, "input": t}, h1) for t in TEXTS]
    calls += [("/v1/classify", {"model": bad, "input": t}, h2) for t in TEXTS]
    responses, _ = await _drive(client, calls)
    for response in responses[: len(TEXTS)]:
        assert response.status_code == 200
    for response in responses[len(TEXTS):]:
        assert_envelope(response, 503, type_="service_unavailable", code="model_unavailable")
    assert {r.tenant_id for r in _ledger(client)} == {t1}  # the refused requests billed nothing


def test_models_list_shows_base_and_training_type(client: TestClient, tenants: Any,
                                                  register_adapter: Callable[..., str],
                                                  register_model: Callable[..., str]) -> None:
    (t1, h1), _, _ = tenants
    adapter = register_adapter(t1)
    full = register_model(t1)
    data = {m["id"]: m for m in client.get("/v1/models", headers=h1).json()["data"]}
    assert (data[adapter]["base_model"], data[adapter]["training_type"]) == ("tiny-base", "lora")
    assert data[full]["training_type"] == "full"  # registered without a type: a full fine-tune, as before
    assert data["tiny-base"]["training_type"] is None
    assert data["tiny-base"]["task"] == "feature-extraction"


def test_another_tenants_adapter_is_404(client: TestClient, tenants: Any, register_adapter: Callable[..., str]) -> None:
    (t1, _), (_, h2), _ = tenants
    adapter = register_adapter(t1)
    for path, body in (("/v1/classify", {"model": adapter, "input": "x"}), (f"/models/{adapter}", {"inputs": "x"})):
        assert_envelope(client.post(path, json=body, headers=h2), 404, code="model_not_found")


def test_an_adapter_whose_base_is_gone_is_503(client: TestClient, tenants: Any,
                                              register_adapter: Callable[..., str], services: Services) -> None:
    (t1, h1), _, _ = tenants
    adapter = register_adapter(t1)
    with services.sessions() as session:
        row = session.get(MlModel, "tiny-base")
        assert row is not None
        row.status = "retired"
        session.commit()
    services.models.invalidate()
    assert_envelope(client.post("/v1/classify", json={"model": adapter, "input": "x"}, headers=h1), 503,
                    code="model_unavailable")
    assert _ledger(client) == []


def test_hf_route_serves_adapters(client: TestClient, tenants: Any, register_adapter: Callable[..., str]) -> None:
    (t1, h1), _, _ = tenants
    adapter = register_adapter(t1, labels=["x", "y", "z"])
    response = client.post(f"/models/{adapter}", json={"inputs": ["one", "two"], "parameters": {"top_k": 2}},
                           headers=h1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body) == 2
    assert all(len(row) == 2 for row in body)
    assert all({item["label"] for item in row} <= {"x", "y", "z"} for row in body)
