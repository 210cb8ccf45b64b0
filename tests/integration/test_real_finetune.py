"""A small real fine-tune end to end: SST-2 rows, the packaged all-MiniLM-L6-v2, the API and the worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelmeter.gateway.services import Services
from modelmeter.trainer import build_worker
from tests.conftest import bearer
from tests.support.shared_data import sst2_rows

pytestmark = pytest.mark.slow


def test_sst2_fine_tune_end_to_end(shared_data: Path, client: TestClient, make_tenant: Any, make_key: Any,
                                   services: Services) -> None:
    headers = bearer(make_key(make_tenant()["id"])["key"])
    rows = sst2_rows(shared_data, 600, seed=11)
    train = "\n".join(json.dumps({"text": s, "label": "positive" if y else "negative"}) for s, y in rows[:500])
    held_out = "\n".join(json.dumps({"text": s, "label": "positive" if y else "negative"}) for s, y in rows[500:])
    train_id = client.post("/v1/files", files={"file": ("sst2.jsonl", train.encode())},
                           data={"purpose": "fine-tune"}, headers=headers).json()["id"]
    val_id = client.post("/v1/files", files={"file": ("val.jsonl", held_out.encode())},
                         data={"purpose": "fine-tune"}, headers=headers).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": "all-MiniLM-L6-v2", "training_file": train_id,
                                                    "validation_file": val_id, "hyperparameters": {"n_epochs": 2}},
                      headers=headers).json()
    assert build_worker(services.settings, engine=services.engine, show_progress=False).run_once()
    done = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()
    assert done["status"] == "succeeded", done
    assert done["result"]["n_validation"] == 100
    assert done["result"]["accuracy"] > 0.6  # 500 rows and 2 epochs already learn sentiment
    verdict = client.post("/v1/classify", json={"model": done["fine_tuned_model"],
                                                 "input": ["a triumph , moving and beautifully acted",
                                                           "a boring , incoherent waste of time"]},
                          headers=headers).json()
    assert [d["label"] for d in verdict["data"]] == ["positive", "negative"]
