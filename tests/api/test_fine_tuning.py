"""Files and fine-tuning jobs through the API, and the worker that runs them (tiny random BERT as the base)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.services import Services, services_of
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.tables import FineTuningJob
from modelmeter.models.registry import MlModel
from modelmeter.settings import Settings
from tests.conftest import ADMIN, assert_envelope, bearer
from tests.support.fine_tuning import create_job, upload, worker_for

POSITIVE = ["a joyous , moving film", "great acting and a fine script", "warm , funny and wise", "a delight"]
NEGATIVE = ["a tedious mess", "dull and lifeless", "the worst film of the year", "boring , boring , boring"]


def _jsonl(n: int = 40) -> bytes:
    rows = [{"text": f"{t} {i}", "label": "positive"} for i, t in enumerate(POSITIVE * (n // 8))]
    rows += [{"text": f"{t} {i}", "label": "negative"} for i, t in enumerate(NEGATIVE * (n // 8))]
    return "\n".join(json.dumps(r) for r in rows).encode()


# --- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "rows"), [
    ("train.jsonl", b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n', 2),
    ("train.csv", b'text,label\n"good, really",pos\nbad,neg\nfine,pos\n', 3),
    ("train.tsv", b"sentence\tlabel\ngood\t1\nbad\t0\n", 2),
])
def test_upload_formats(client: TestClient, tenant: Any, name: str, data: bytes, rows: int) -> None:
    _, headers = tenant
    response = upload(client, headers, data, name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "file"
    assert body["purpose"] == "fine-tune"
    assert body["rows"] == rows
    assert body["bytes"] == len(data)
    assert body["filename"] == name
    assert client.get(f"/v1/files/{body['id']}", headers=headers).json() == body
    assert [f["id"] for f in client.get("/v1/files", headers=headers).json()["data"]] == [body["id"]]


@pytest.mark.parametrize(("data", "needle"), [
    (b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "oops", "label"\n', "line 3"),
    (b'{"text": "good", "label": 1}\n{"label": 0}\n', "line 2"),
    (b'{"text": "good", "label": 1}\n{"text": "bad", "label": 1}\n', "label"),
    (b"", "empty"),
    (b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 0}\n', "line 2"),
    (b'{"text": "good", "label": 1.5}\n{"text": "bad", "label": 0}\n', "line 1"),
    # Hostile files (issue 21): a line nested past the recursion limit was a 500; labels had no bounds.
    (b'{"text": "good", "label": 1}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 2: malformed JSON: nested"),
    (b'{"text": "good", "label": 1}\n{"text": "bad", "label": "' + b"x" * 101 + b'"}\n', "line 2: 'label' is 101"),
    (b'{"text": "good", "label": 1}\n{"text": "bad", "label": "a\\u0000b"}\n', "line 2: 'label' contains"),
    (b'{"text": "good", "label": 1}\n{"text": "bad", "label": "a\\u202eb"}\n', "line 2: 'label' contains"),
])
def test_upload_refusals_name_the_line_and_store_nothing(
    client: TestClient, tenant: Any, data: bytes, needle: str
) -> None:
    _, headers = tenant
    error = assert_envelope(upload(client, headers, data), 422, code="invalid_file")
    assert needle in error["message"], error
    assert client.get("/v1/files", headers=headers).json()["data"] == []
    files_dir = services_of(client.app).settings.data_dir / "files"
    assert not files_dir.exists() or not any(files_dir.rglob("*"))


def test_upload_missing_column_and_purpose(client: TestClient, tenant: Any) -> None:
    _, headers = tenant
    error = assert_envelope(upload(client, headers, b"sentence,stars\ngood,5\n", "t.csv"), 422, code="invalid_file")
    assert "line 1" in error["message"]
    bad_purpose = client.post("/v1/files", files={"file": ("t.jsonl", _jsonl())}, data={"purpose": "assistants"},
                              headers=headers)
    assert_envelope(bad_purpose, 422, code="invalid_value")
    assert_envelope(client.post("/v1/files", data={"purpose": "fine-tune"}, headers=headers), 422)


def test_oversized_file_is_413(settings: Settings, tenant: Any, app_factory: Any) -> None:
    _, headers = tenant
    with TestClient(app_factory(max_file_bytes=1000)) as small:
        assert_envelope(upload(small, headers, _jsonl(400)), 413)


def test_files_are_isolated_and_deletable(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    a, b = make_tenant(), make_tenant()
    ha, hb = bearer(make_key(a["id"])["key"]), bearer(make_key(b["id"])["key"])
    file_id = upload(client, ha, _jsonl()).json()["id"]
    assert_envelope(client.get(f"/v1/files/{file_id}", headers=hb), 404)
    assert_envelope(client.delete(f"/v1/files/{file_id}", headers=hb), 404)
    assert client.get("/v1/files", headers=hb).json()["data"] == []
    assert client.delete(f"/v1/files/{file_id}", headers=ha).json() == {"id": file_id, "object": "file",
                                                                       "deleted": True}
    assert_envelope(client.get(f"/v1/files/{file_id}", headers=ha), 404)


# --- jobs ------------------------------------------------------------------------------------------


def test_job_state_machine_and_cancel(client: TestClient, tenant: Any, base: str) -> None:
    _, headers = tenant
    file_id = upload(client, headers, _jsonl()).json()["id"]
    job = create_job(client, headers, file_id, base, suffix="demo", seed=7).json()
    assert job["object"] == "fine_tuning.job"
    assert job["status"] == "queued"
    assert job["hyperparameters"] == {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0}
    assert (job["seed"], job["training_file"], job["fine_tuned_model"]) == (7, file_id, None)
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=headers)
                .json()["data"]]
    assert messages[0] == "Files validated; job queued."
    assert messages[-1].startswith("Validating training file")
    assert_envelope(client.delete(f"/v1/files/{file_id}", headers=headers), 409, code="file_in_use")
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=headers).json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    assert_envelope(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=headers), 409,
                    code="job_finished")
    assert worker_for(client).run_once() is False  # nothing left to run


def test_job_defaults_and_refusals(client: TestClient, tenant: Any, base: str, make_tenant: Any,
                                   make_key: Any) -> None:
    _tenant_id, headers = tenant
    file_id = upload(client, headers, _jsonl()).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": file_id},
                      headers=headers).json()
    assert job["hyperparameters"]["n_epochs"] >= 1
    assert job["hyperparameters"]["batch_size"] >= 1
    other = bearer(make_key(make_tenant()["id"])["key"])
    assert_envelope(create_job(client, other, file_id, base), 404, code="file_not_found")
    assert_envelope(create_job(client, headers, file_id, "gpt-4o"), 404, code="model_not_found")
    assert_envelope(create_job(client, headers, file_id, base, hyperparameters={"n_epochs": 0}), 422)
    assert_envelope(create_job(client, headers, file_id, base, method={"type": "dpo"}), 422, code="unknown_field")
    three_labels = upload(client, headers, b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'
                                           b'{"text": "c", "label": "z"}\n').json()["id"]
    assert_envelope(create_job(client, headers, file_id, base, validation_file=three_labels), 422,
                    code="invalid_validation_file")
    create_job(client, headers, file_id, base)  # the second active job: the limit is 2
    assert_envelope(create_job(client, headers, file_id, base), 429, code="too_many_active_jobs")
    assert len(client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"]) == 2
    assert_envelope(client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=other), 404)
    assert_envelope(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=other), 404)


@pytest.mark.parametrize(("training_type", "stored", "artifact"), [
    (None, {"type": "lora", "rank": 8, "alpha": 16}, "adapter_model.safetensors"),
    ({"type": "lora", "rank": 4}, {"type": "lora", "rank": 4, "alpha": 8}, "adapter_model.safetensors"),
    ({"type": "full"}, {"type": "full"}, "model.safetensors"),
])
def test_worker_trains_registers_and_meters(client: TestClient, tenant: Any, base: str, training_type: Any,
                                            stored: dict[str, Any], artifact: str, services: Services) -> None:
    tenant_id, headers = tenant
    data = _jsonl(48)
    file_id = upload(client, headers, data).json()["id"]
    extra = {"training_type": training_type} if training_type else {}
    job = create_job(client, headers, file_id, base, suffix="sent", hyperparameters={"n_epochs": 2, "batch_size": 8},
                     **extra)
    assert job.json()["training_type"] == stored
    job_id = job.json()["id"]
    assert worker_for(client).run_once() is True
    done = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    assert done["status"] == "succeeded", done
    model = done["fine_tuned_model"]
    assert model.startswith(f"ft:{base}:sent:")
    result = done["result"]
    assert set(result["per_label"]) == {"negative", "positive"}
    assert {"precision", "recall", "f1", "support"} <= set(result["per_label"]["positive"])
    assert 0 <= result["accuracy"] <= 1
    assert result["n_validation"] >= 2
    kinds = {e["type"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=headers)
             .json()["data"]}
    assert "metrics" in kinds

    served = client.post("/v1/classify", json={"model": model, "input": "a joyous film"}, headers=headers)
    assert served.status_code == 200
    assert set(served.json()["data"][0]["scores"]) == {"negative", "positive"}
    hf = client.post(f"/models/{model}", json={"inputs": "dull"}, headers=headers)
    assert hf.status_code == 200
    assert len(hf.json()[0]) == 2
    assert model in [m["id"] for m in client.get("/v1/models", headers=headers).json()["data"]]

    with services.sessions() as session:
        training = session.exec(select(UsageEvent).where(UsageEvent.kind == "training")).one()
        model_row = session.get(MlModel, model)
    assert training.training_tokens == done["trained_tokens"] > 0
    assert training.requests == 0
    assert model_row is not None
    assert model_row.owner_tenant_id == tenant_id
    assert model_row.training_type == stored["type"]
    assert (services.settings.data_dir / model_row.artifact / artifact).exists()
    listed = {m["id"]: m for m in client.get("/v1/models", headers=headers).json()["data"]}[model]
    assert (listed["base_model"], listed["training_type"]) == (base, stored["type"])
    assert done["training_type"] == stored
    server = services.engines.server
    assert (model in server.pool.loaded()) == (stored["type"] == "full")  # adapters run on the shared base


@pytest.mark.parametrize(("training_type", "param"), [
    ({"type": "lora", "rank": 0}, "training_type.rank"),
    ({"type": "lora", "rank": 65}, "training_type.rank"),
    ({"type": "lora", "rank": "8"}, "training_type.rank"),
    ({"type": "lora", "rank": 8.5}, "training_type.rank"),
    ({"type": "lora", "alpha": 0}, "training_type.alpha"),
    ({"type": "prefix"}, "training_type.type"),
    ({"rank": 8}, "training_type.type"),
    ({"type": "lora", "dropout": 0.1}, "training_type.dropout"),
    ({"type": "full", "rank": 8}, "training_type"),
    ("lora", "training_type"),
])
def test_training_type_refusals_name_the_field_and_write_nothing(client: TestClient, tenant: Any, base: str,
                                                                  training_type: Any, param: str) -> None:
    _, headers = tenant
    file_id = upload(client, headers, _jsonl()).json()["id"]
    response = create_job(client, headers, file_id, base, training_type=training_type)
    error = assert_envelope(response, 422)
    assert error["param"] == param, error
    assert client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"] == []


def test_fine_tuned_model_is_private(client: TestClient, tenant: Any, base: str, make_tenant: Any,
                                     make_key: Any) -> None:
    _, headers = tenant
    file_id = upload(client, headers, _jsonl()).json()["id"]
    job_id = create_job(client, headers, file_id, base).json()["id"]
    worker_for(client).run_once()
    model = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()["fine_tuned_model"]
    other = bearer(make_key(make_tenant()["id"])["key"])
    assert_envelope(client.post("/v1/classify", json={"model": model, "input": "x"}, headers=other), 404)


def test_crashed_worker_job_is_requeued_and_finished(client: TestClient, tenant: Any, base: str,
                                                     services: Services) -> None:
    _, headers = tenant
    file_id = upload(client, headers, _jsonl()).json()["id"]
    job_id = create_job(client, headers, file_id, base).json()["id"]
    worker = worker_for(client)
    dead = f"{worker.host}:999999:dead"  # a worker on this host whose process no longer exists
    assert jobs.claim_next(sessions=services.sessions, worker_id=dead) == job_id
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()["status"] == "running"
    assert worker.run_once() is True
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "succeeded"
    messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100",
                                                 headers=headers).json()["data"]]
    assert any("re-queued" in m for m in messages)


def test_stale_heartbeat_from_another_host_fails_after_retries(client: TestClient, tenant: Any, base: str,
                                                               services: Services) -> None:
    _, headers = tenant
    file_id = upload(client, headers, _jsonl()).json()["id"]
    job_id = create_job(client, headers, file_id, base).json()["id"]
    with services.sessions() as session:
        job = session.get(FineTuningJob, job_id)
        job.status, job.worker_id, job.heartbeat_at, job.attempts = "running", "elsewhere:1:x", 1, 2
        session.commit()
    worker_for(client).run_once()
    job_body = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    assert job_body["status"] == "failed"
    assert job_body["error"]["code"] == "worker_died"


def test_cancel_stops_a_running_job_within_seconds(client: TestClient, tenant: Any, base: str,
                                                   services: Services) -> None:
    _, headers = tenant
    file_id = upload(client, headers, _jsonl(800)).json()["id"]
    job_id = create_job(client, headers, file_id, base, hyperparameters={"n_epochs": 50, "batch_size": 4}).json()["id"]
    worker = worker_for(client)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    cancelled_at = time.monotonic()
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers).json()["status"] == "cancelled"
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < 10
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "cancelled"
    assert job["fine_tuned_model"] is None
    tenant_models = services.settings.data_dir / "models" / tenant[0]
    assert not tenant_models.exists() or not any(tenant_models.iterdir())  # nothing half-written
    with services.sessions() as session:
        assert session.exec(select(UsageEvent).where(UsageEvent.kind == "training")).all() == []


def test_two_workers_never_claim_the_same_job(client: TestClient, tenant: Any, base: str, make_tenant: Any,
                                              make_key: Any, services: Services) -> None:
    created = []
    for _ in range(4):  # 4 tenants x 2 active jobs
        t = make_tenant()
        h = bearer(make_key(t["id"])["key"])
        file_id = upload(client, h, _jsonl()).json()["id"]
        created += [create_job(client, h, file_id, base).json()["id"] for _ in range(2)]
    claimed: list[str] = []
    lock = threading.Lock()

    def claim(worker: int) -> None:
        while (job_id := jobs.claim_next(sessions=services.sessions, worker_id=f"w{worker}")) is not None:
            with lock:
                claimed.append(job_id)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(created)  # every job once, none twice
    with services.sessions() as session:
        owners = {j.id: j.worker_id for j in session.exec(select(FineTuningJob)).all()}
    assert all(owner is not None and owner.startswith("w") for owner in owners.values())




def test_training_quota_and_budget_are_checked_before_queueing(client: TestClient, make_tenant: Any,
                                                              make_key: Any, base: str) -> None:
    free = make_tenant(plan="free")  # 200,000 included training tokens, hard limit
    headers = bearer(make_key(free["id"])["key"])
    file_id = upload(client, headers, _jsonl(800)).json()["id"]
    refused = create_job(client, headers, file_id, base, hyperparameters={"n_epochs": 50})
    assert_envelope(refused, 429, type_="insufficient_quota")
    accepted = create_job(client, headers, file_id, base, hyperparameters={"n_epochs": 1})
    assert accepted.status_code == 200, accepted.text
    assert len(client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"]) == 1

    payg = make_tenant(plan="payg")  # $2.00 per 1M training tokens: a 1-cent budget buys 5,000 tokens
    client.patch(f"/admin/tenants/{payg['id']}", json={"monthly_budget_cents": 1}, headers=ADMIN)
    payg_headers = bearer(make_key(payg["id"])["key"])
    small = upload(client, payg_headers, _jsonl(40)).json()["id"]
    assert_envelope(create_job(client, payg_headers, small, base, hyperparameters={"n_epochs": 50}), 429,
                    code="insufficient_quota")
    assert create_job(client, payg_headers, small, base, hyperparameters={"n_epochs": 1}).status_code == 200


def test_claiming_one_job_leaves_every_other_queued(client: TestClient, base: str, make_tenant: Any, make_key: Any,
                                                    services: Services) -> None:
    """``claim_next(only=…)``: what the quickstart's in-process trainer uses, so it never trains another tenant's
    job, even an older one."""
    ids = []
    for _ in range(2):
        h = bearer(make_key(make_tenant()["id"])["key"])
        ids.append(create_job(client, h, upload(client, h, _jsonl()).json()["id"], base).json()["id"])
    older, mine = ids
    assert jobs.claim_next(sessions=services.sessions, worker_id="qs", only=mine) == mine
    assert jobs.claim_next(sessions=services.sessions, worker_id="qs", only=mine) is None  # not queued any more
    with services.sessions() as session:
        assert session.get(FineTuningJob, older).status == "queued"  # type: ignore[union-attr]


def test_a_file_is_tokenized_once_however_many_jobs_use_it(client: TestClient, tenant: Any, base: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack (issue 21): each job creation tokenized the whole file before refusing it (~3.6 s for 6.6 MB),
    unbounded in count. Now the upload counts the tokens once; jobs read the count."""
    from modelmeter.models.text import TextEncoder

    calls: list[int] = []
    real = TextEncoder.tokenize

    def counting(self: TextEncoder, texts: list[str], *, truncate: bool) -> Any:
        calls.append(len(texts))
        return real(self, texts, truncate=truncate)

    monkeypatch.setattr(TextEncoder, "tokenize", counting)
    _, headers = tenant
    file_id = upload(client, headers, _jsonl()).json()["id"]
    assert calls == [40]
    estimates = []
    for _ in range(3):
        job = create_job(client, headers, file_id, base)
        assert job.status_code == 200, job.text
        estimates.append(job.json()["id"])
        client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel", headers=headers)
    assert calls == [40]  # no job tokenized it again
    services = services_of(client.app)
    from modelmeter.models.finetune.tables import FineTuningJob

    with services.sessions() as session:
        kept = {session.get(FineTuningJob, job_id).estimated_tokens for job_id in estimates}  # type: ignore[union-attr]
    assert len(kept) == 1
    assert kept.pop() > 40


def test_an_explicit_validation_file_is_bounded_and_billed(client: TestClient, tenant: Any, base: str,
                                                           services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before (issue 21): a tenant's own validation file was evaluated in full and never billed."""
    from modelmeter.models.finetune import worker as worker_module
    from modelmeter.models.finetune.estimate import epoch_tokens
    from modelmeter.models.registry import artifact_path

    monkeypatch.setattr(worker_module, "MAX_VALIDATION_ROWS", 10)
    _, headers = tenant
    train_id = upload(client, headers, _jsonl(16)).json()["id"]
    validation_id = upload(client, headers, _jsonl(40), name="validation.jsonl").json()["id"]
    job = create_job(client, headers, train_id, base, validation_file=validation_id)
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    assert worker_for(client).run_once() is True
    done = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    assert done["status"] == "succeeded", done
    assert done["result"]["n_validation"] == 10  # a seeded sample, as large as the automatic hold-out may be
    events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100",
                                               headers=headers).json()["data"]]
    assert any("validating on 10 rows" in m for m in events)
    with services.sessions() as session:
        base_row = session.get(MlModel, base)
        assert base_row is not None
        estimated = session.get(FineTuningJob, job_id).estimated_tokens  # type: ignore[union-attr]
    base_dir = artifact_path(base_row.artifact, services.settings.data_dir)
    train_tokens = epoch_tokens(base_dir, [json.loads(line)["text"] for line in _jsonl(16).decode().splitlines()])
    assert train_tokens < done["trained_tokens"] <= train_tokens + epoch_tokens(
        base_dir, [json.loads(line)["text"] for line in _jsonl(40).decode().splitlines()])
    assert estimated >= done["trained_tokens"]  # the estimate held against the quota covers what is billed
