"""``GET /admin/engine`` on the in-process engine: this process is the front and the engine, its counters move with
the batches served, and only the admin token reads it."""

from __future__ import annotations

import os
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import ADMIN, assert_envelope, bearer


def test_admin_engine_reports_the_in_process_engine_and_its_counters(
        client: TestClient, make_tenant: Any, make_key: Any, register_model: Any) -> None:
    tenant = make_tenant()
    headers = bearer(make_key(tenant["id"])["key"])
    model = register_model(tenant["id"], task="feature-extraction")
    before = client.get("/admin/engine", headers=ADMIN)
    assert before.status_code == 200
    body = before.json()
    assert body["fronts"] == [{"pid": os.getpid()}]
    assert len(body["engines"]) == 1
    engine = body["engines"][0]
    assert set(engine) == {"pid", "device", "simulated", "batches", "rows", "mixed_batches", "low_rows", "queue_rows",
                           "adapters_resident", "dropped_messages"}
    assert engine["pid"] == os.getpid()
    assert engine["device"] == "cpu"
    assert engine["simulated"] is False
    served = client.post("/v1/embeddings", json={"model": model, "input": ["one", "two", "three"]}, headers=headers)
    assert served.status_code == 200, served.text
    after = client.get("/admin/engine", headers=ADMIN).json()["engines"][0]
    assert after["rows"] == engine["rows"] + 3
    assert after["batches"] >= engine["batches"] + 1
    assert after["queue_rows"] == 0


def test_admin_engine_needs_the_admin_token(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    assert_envelope(client.get("/admin/engine"), 401)
    tenant_key = make_key(make_tenant()["id"])["key"]
    assert client.get("/admin/engine", headers=bearer(tenant_key)).status_code in (401, 403)


def test_readyz_checks_the_engine(client: TestClient) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "engine": "ok"}
