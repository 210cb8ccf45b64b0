"""Files and fine-tuning jobs through the API, and a worker that runs them in the test process."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from modelmeter.gateway.services import services_of
from modelmeter.trainer import build_worker


def upload(client: TestClient, headers: dict[str, str], data: bytes, name: str = "train.jsonl") -> Any:
    return client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"}, headers=headers)


def create_job(client: TestClient, headers: dict[str, str], file_id: str, base: str, **extra: Any) -> Any:
    body = {"model": base, "training_file": file_id, "hyperparameters": {"n_epochs": 1, "batch_size": 8}, **extra}
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers)


def worker_for(client: TestClient) -> Any:
    services = services_of(client.app)
    return build_worker(services.settings, engine=services.engine, show_progress=False)
