"""``serve`` starts a fine-tuning worker in a subprocess that runs queued jobs against the same database."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi.testclient import TestClient

from modelmeter.gateway.app import create_app
from modelmeter.settings import Settings
from tests.conftest import bearer


def test_serve_spawns_a_worker_that_trains(settings: Settings, client: TestClient, make_tenant: Any,
                                           make_key: Any, register_model: Any) -> None:
    base = register_model(None, task="feature-extraction", model_id="tiny-base")
    tenant = make_tenant()
    headers = bearer(make_key(tenant["id"])["key"])
    rows = [json.dumps({"text": f"{w} {i}", "label": w}) for i in range(8) for w in ("good", "bad")]
    with TestClient(create_app(settings.model_copy(update={"start_worker": True}))) as served:
        file_id = served.post("/v1/files", files={"file": ("t.jsonl", "\n".join(rows).encode())},
                              data={"purpose": "fine-tune"}, headers=headers).json()["id"]
        job = served.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": file_id,
                                                        "hyperparameters": {"n_epochs": 1}}, headers=headers).json()
        deadline = time.monotonic() + 180
        status = job["status"]
        while status not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
            status = served.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["status"]
        assert status == "succeeded"
        model = served.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["fine_tuned_model"]
        assert served.post("/v1/classify", json={"model": model, "input": "good"}, headers=headers).status_code == 200
