"""Serving through the HTTP API with tiny random BERTs: shapes, usage, headers, ledger, isolation, refusals."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from transformers import AutoTokenizer

from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import Services, services_of
from tests.conftest import ADMIN, assert_envelope, bearer

TEXTS = ["a fine film", "the worst, most tedious two hours I have spent in a cinema this year", "ok"]


@pytest.fixture
def tenant_key(make_tenant: Any, make_key: Any) -> tuple[str, str]:
    tenant = make_tenant()
    return tenant["id"], make_key(tenant["id"])["key"]


def _ledger(client: TestClient) -> list[UsageEvent]:
    services = services_of(client.app)
    with services.sessions() as session:
        return list(session.exec(select(UsageEvent).order_by(UsageEvent.id)).scalars())  # type: ignore[arg-type]


def _tokens(client: TestClient, model_dir: str, texts: list[str], **kw: Any) -> list[int]:
    services = services_of(client.app)
    tokenizer = AutoTokenizer.from_pretrained(str(services.settings.data_dir / model_dir), local_files_only=True)
    return [len(ids) for ids in tokenizer(texts, **kw)["input_ids"]]


def test_classify_shapes_usage_headers_and_ledger(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id, labels=["neg", "pos"])
    response = client.post("/v1/classify", json={"model": model, "input": TEXTS}, headers=bearer(key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == model
    expected_tokens = _tokens(client, f"models/{tenant_id}/{model}", TEXTS)
    assert body["usage"] == {"prompt_tokens": sum(expected_tokens), "total_tokens": sum(expected_tokens)}
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    for item in body["data"]:
        assert set(item["scores"]) == {"neg", "pos"}
        assert abs(sum(item["scores"].values()) - 1) < 1e-5
        assert item["label"] == max(item["scores"], key=item["scores"].get)
        assert item["score"] == item["scores"][item["label"]]
    assert response.headers["x-compute-tokens"] == str(sum(expected_tokens))
    assert float(response.headers["x-queue-time"]) >= 0
    assert float(response.headers["x-inference-time"]) > 0

    (row,) = _ledger(client)
    assert (row.tenant_id, row.model_id, row.inputs, row.requests) == (tenant_id, model, 3, 1)
    assert row.tokens == sum(expected_tokens)
    assert row.request_id == response.headers["x-request-id"]
    assert row.kind == "inference"
    assert row.key_id is not None
    assert row.compute_us > 0
    assert row.endpoint == "classify"


def test_single_string_input(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id)
    body = client.post("/v1/classify", json={"model": model, "input": "hello"}, headers=bearer(key)).json()
    assert len(body["data"]) == 1
    assert body["usage"]["prompt_tokens"] == 3


def test_alone_equals_inside_a_batch(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    classifier = register_model(tenant_id)
    embedder = register_model(tenant_id, task="feature-extraction")
    mixed = [TEXTS[1], "short", TEXTS[0] * 8, "x"]
    together = client.post("/v1/classify", json={"model": classifier, "input": mixed}, headers=bearer(key)).json()
    vectors = client.post("/v1/embeddings", json={"model": embedder, "input": mixed}, headers=bearer(key)).json()
    for i, text in enumerate(mixed):
        alone = client.post("/v1/classify", json={"model": classifier, "input": text}, headers=bearer(key)).json()
        for label, p in alone["data"][0]["scores"].items():
            assert abs(together["data"][i]["scores"][label] - p) < 1e-5
        single = client.post("/v1/embeddings", json={"model": embedder, "input": text}, headers=bearer(key)).json()
        np.testing.assert_allclose(vectors["data"][i]["embedding"], single["data"][0]["embedding"], atol=1e-5)


def test_embeddings_float_and_base64(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id, task="feature-extraction")
    floats = client.post("/v1/embeddings", json={"model": model, "input": TEXTS}, headers=bearer(key)).json()
    b64 = client.post("/v1/embeddings", json={"model": model, "input": TEXTS, "encoding_format": "base64"},
                      headers=bearer(key)).json()
    assert floats["object"] == "list"
    assert floats["data"][0]["object"] == "embedding"
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_allclose(decoded, f["embedding"], atol=1e-6)
        assert abs(np.linalg.norm(f["embedding"]) - 1) < 1e-5
    assert len(_ledger(client)) == 2


def test_hf_format(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    classifier = register_model(tenant_id, labels=["a", "b", "c"])
    embedder = register_model(tenant_id, task="feature-extraction")
    ranked = client.post(f"/models/{classifier}", json={"inputs": "nice", "parameters": {"top_k": 2}},
                         headers=bearer(key)).json()
    assert len(ranked) == 1
    assert len(ranked[0]) == 2
    assert ranked[0][0]["score"] >= ranked[0][1]["score"]
    vectors = client.post(f"/models/{embedder}", json={"inputs": ["a", "b"], "normalize": True},
                          headers=bearer(key)).json()
    assert len(vectors) == 2
    assert len(vectors[0]) == 32


def test_task_mismatch_is_422_and_unbilled(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    classifier = register_model(tenant_id)
    response = client.post("/v1/embeddings", json={"model": classifier, "input": "x"}, headers=bearer(key))
    assert_envelope(response, 422, code="unsupported_task")
    assert _ledger(client) == []


def test_tenant_isolation_of_models(client: TestClient, make_tenant: Any, make_key: Any, register_model: Any) -> None:
    owner, other = make_tenant(), make_tenant()
    model = register_model(owner["id"])
    other_key = make_key(other["id"])["key"]
    owner_key = make_key(owner["id"])["key"]
    for path, body in (("/v1/classify", {"model": model, "input": "x"}), (f"/models/{model}", {"inputs": "x"})):
        assert_envelope(client.post(path, json=body, headers=bearer(other_key)), 404, code="model_not_found")
    assert_envelope(client.post("/v1/classify", json={"model": "nope", "input": "x"}, headers=bearer(owner_key)), 404)
    ids = lambda k: [m["id"] for m in client.get("/v1/models", headers=bearer(k)).json()["data"]]  # noqa: E731
    assert model in ids(owner_key)
    assert model not in ids(other_key)
    assert "all-MiniLM-L6-v2" in ids(other_key)
    assert _ledger(client) == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"input": ""}, "invalid_value"),
        ({"input": []}, "invalid_value"),
        ({"input": ["ok", 5]}, "invalid_value"),
        ({"input": 5}, "invalid_value"),
        ({"input": ["ok", None]}, "invalid_value"),
        ({"input": "ok", "truncate": "yes"}, "invalid_value"),
        ({"input": "ok", "temperature": 1}, "unknown_field"),
        ({"input": ["x"] * 257}, "too_many_inputs"),
        ({"input": "word " * 600}, "context_length_exceeded"),
    ],
)
def test_bad_input_is_refused_and_unbilled(
    client: TestClient, tenant_key: Any, register_model: Any, body: dict[str, Any], code: str
) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id)
    assert_envelope(client.post("/v1/classify", json={"model": model, **body}, headers=bearer(key)), 422, code=code)
    assert _ledger(client) == []


def test_truncate_bills_what_was_processed(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id)
    body = client.post("/v1/classify", json={"model": model, "input": "word " * 600, "truncate": True},
                       headers=bearer(key)).json()
    assert body["usage"]["prompt_tokens"] == 512
    assert _ledger(client)[0].tokens == 512


def test_oversized_body_is_413_and_unbilled(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id)
    response = client.post("/v1/classify", json={"model": model, "input": ["a" * 1000] * 1100}, headers=bearer(key))
    assert_envelope(response, 413)
    assert _ledger(client) == []


def test_non_utf8_body_is_refused(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id)
    raw = b'{"model": "' + model.encode() + b'", "input": "caf\xe9"}'
    response = client.post("/v1/classify", content=raw, headers={**bearer(key), "content-type": "application/json"})
    assert response.status_code in (400, 422)
    assert_envelope(response, response.status_code)
    assert _ledger(client) == []


def test_failed_load_is_503_then_retried(client: TestClient, tenant_key: Any, register_model: Any) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id)
    weights = services_of(client.app).settings.data_dir / "models" / tenant_id / model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"corrupt")
    assert_envelope(client.post("/v1/classify", json={"model": model, "input": "x"}, headers=bearer(key)), 503,
                    code="model_unavailable")
    weights.write_bytes(good)
    assert client.post("/v1/classify", json={"model": model, "input": "x"}, headers=bearer(key)).status_code == 200
    assert len(_ledger(client)) == 1


def test_scope_inference_required(client: TestClient, make_tenant: Any, make_key: Any, register_model: Any) -> None:
    tenant = make_tenant()
    model = register_model(tenant["id"])
    key = make_key(tenant["id"], scopes=["billing:read"])["key"]
    assert_envelope(client.post("/v1/classify", json={"model": model, "input": "x"}, headers=bearer(key)), 403,
                    code="insufficient_scope")


@pytest.mark.anyio
async def test_concurrent_requests_one_row_each_and_one_load(
    client: TestClient, tenant_key: Any, register_model: Any
) -> None:
    tenant_id, key = tenant_key
    model = register_model(tenant_id)
    app = create_app(services_of(client.app).settings)
    batches: list[int] = []
    server = services_of(app).engines.server
    server._on_batch = lambda _m: (lambda size, *_: batches.append(size))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            async def one(i: int) -> httpx.Response:
                return await http.post("/v1/classify", json={"model": model, "input": f"sentence number {i}"},
                                       headers=bearer(key))
            responses = await asyncio.gather(*(one(i) for i in range(64)))
    assert all(r.status_code == 200 for r in responses)
    assert server.pool.load_count == 1
    rows = _ledger(client)
    assert len(rows) == 64
    assert {r.request_id for r in rows} == {r.headers["x-request-id"] for r in responses}
    assert max(batches) > 1  # requests really were batched together



def test_usage_row_is_idempotent(client: TestClient, tenant_key: Any, services: Services) -> None:
    from modelmeter.billing.ledger import UsageRecord, record_usage

    tenant_id, _ = tenant_key
    record = UsageRecord(request_id="req_same", tenant_id=tenant_id, model_id="m", created=1_700_000_000, tokens=5)
    with services.sessions() as session:
        assert record_usage(session=session, records=[record]) == 1
        assert record_usage(session=session, records=[record, record]) == 0
        session.commit()
        assert session.execute(select(func.count()).select_from(UsageEvent)).scalar() == 1
    _ = ADMIN
