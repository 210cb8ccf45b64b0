"""Named-entity files and fine-tuning through the API (tiny random BERT as the base): both row forms, refusals that
name the line and store nothing, a job with ``task: token-classification`` trained by the worker (LoRA and full),
its seqeval report, and the tagger served at once by ``/v1/entities``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.services import Services
from modelmeter.models.finetune.tables import TenantFile
from tests.conftest import assert_envelope
from tests.support.fine_tuning import create_job, upload, worker_for

NAMES = ["Anna", "Omar", "Lena", "Kenji"]
PLACES = ["Oslo", "Lima", "Kyoto", "Cairo"]


def tagged(n: int = 48) -> bytes:
    rows = []
    for i in range(n):
        name, place = NAMES[i % 4], PLACES[(i // 4) % 4]
        rows.append({"tokens": [name, "flew", "to", place, "on", "day", str(i)],
                     "tags": ["B-PER", "O", "O", "B-LOC", "O", "O", "O"]})
    return "\n".join(json.dumps(r) for r in rows).encode()


def spans(n: int = 48) -> bytes:
    rows = []
    for i in range(n):
        name, place = NAMES[i % 4], PLACES[(i // 4) % 4]
        text = f"{name} flew to {place} on day {i}"
        rows.append({"text": text, "entities": [{"start": 0, "end": len(name), "label": "PER"},
                                                {"start": text.index(place), "end": text.index(place) + len(place),
                                                 "label": "LOC"}]})
    return "\n".join(json.dumps(r) for r in rows).encode()


def files_of(services: Services, tenant_id: str) -> int:
    with services.sessions() as session:
        query = select(func.count()).select_from(TenantFile).where(TenantFile.tenant_id == tenant_id)
        return int(session.exec(query).one())


@pytest.mark.parametrize("form", [tagged, spans], ids=["tokens", "spans"])
def test_both_forms_upload_as_token_classification(client: TestClient, tenant: Any, form: Any) -> None:
    _, headers = tenant
    response = upload(client, headers, form())
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["task"], body["labels"], body["rows"], body["status_details"]) == (
        "token-classification", ["LOC", "PER"], 48, None)


def test_an_orphan_i_tag_begins_an_entity_and_the_upload_says_so(client: TestClient, tenant: Any) -> None:
    _, headers = tenant
    rows = tagged(8).decode().split("\n")
    rows[2] = json.dumps({"tokens": ["Anna", "flew"], "tags": ["I-PER", "O"]})
    body = upload(client, headers, "\n".join(rows).encode()).json()
    assert body["status_details"] == "line 3: I-PER with no PER to continue begins an entity (IOB2)"


BAD = {
    "mixed forms": ('{"text": "Anna", "entities": []}', 3, "one form per file"),
    "empty tokens": ('{"tokens": [], "tags": []}', 3, "'tokens' is empty"),
    "lengths": ('{"tokens": ["a", "b"], "tags": ["O"]}', 3, "one tag per token"),
    "scheme": ('{"tokens": ["a"], "tags": ["PER"]}', 3, "expected IOB2 tags"),
    "long type": ('{"tokens": ["a"], "tags": ["B-' + "X" * 51 + '"]}', 3, "at most 50"),
    "control": ('{"tokens": ["a"], "tags": ["B-P\\u0000R"]}', 3, "control or format character"),
    "not a string": ('{"tokens": ["a", 3], "tags": ["O", "O"]}', 3, "'tokens[1]' must be a string"),
    "nested": ('{"tokens": ' + "[" * 5000 + "]" * 5000 + "}", 3, "nested too deeply"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_rows_are_refused_naming_the_line(client: TestClient, tenant: Any, services: Services,
                                              name: str) -> None:
    tenant_id, headers = tenant
    row, line, message = BAD[name]
    lines = tagged(4).decode().split("\n")
    lines.insert(line - 1, row)
    response = upload(client, headers, "\n".join(lines).encode())
    error = assert_envelope(response, 422, code="invalid_file")
    assert f"line {line}:" in error["message"]
    assert message in error["message"]
    assert files_of(services, tenant_id) == 0


SPAN_BAD = {
    "out of range": ({"start": 0, "end": 99, "label": "PER"}, "0 <= start < end"),
    "overlap": ({"start": 2, "end": 6, "label": "LOC"}, "overlaps 'entities[0]'"),
    "bool": ({"start": True, "end": 4, "label": "PER"}, "must be an integer"),
}


@pytest.mark.parametrize("name", list(SPAN_BAD))
def test_bad_spans_are_refused_naming_the_line_and_field(client: TestClient, tenant: Any, name: str) -> None:
    _, headers = tenant
    span, message = SPAN_BAD[name]
    rows = spans(3).decode().split("\n")
    rows[1] = json.dumps({"text": "Anna flew", "entities": [{"start": 0, "end": 4, "label": "PER"}, span]
                          if name == "overlap" else [span]})
    error = assert_envelope(upload(client, headers, "\n".join(rows).encode()), 422, code="invalid_file")
    assert "line 2:" in error["message"]
    assert message in error["message"]


def test_more_than_100_types_are_refused(client: TestClient, tenant: Any) -> None:
    _, headers = tenant
    rows = [json.dumps({"tokens": ["a"], "tags": [f"B-T{i}"]}) for i in range(101)]
    error = assert_envelope(upload(client, headers, "\n".join(rows).encode()), 422, code="invalid_file")
    assert "line 101:" in error["message"]
    assert "at most 100" in error["message"]


def test_a_job_must_name_the_files_task(client: TestClient, tenant: Any, base: str) -> None:
    _, headers = tenant
    file_id = upload(client, headers, tagged()).json()["id"]
    refused = create_job(client, headers, file_id, base)  # task defaults to text-classification
    error = assert_envelope(refused, 422, code="invalid_training_file")
    assert "token-classification" in error["message"]


@pytest.mark.parametrize("training_type", ["lora", "full"])
def test_worker_trains_a_tagger_that_serves_at_once(client: TestClient, tenant: Any, base: str,
                                                    services: Services, training_type: str) -> None:
    tenant_id, headers = tenant
    file_id = upload(client, headers, tagged(64)).json()["id"]
    job = create_job(client, headers, file_id, base, task="token-classification", suffix="ner",
                     training_type={"type": training_type}, hyperparameters={"n_epochs": 2, "batch_size": 8})
    assert job.status_code == 200, job.text
    assert job.json()["task"] == "token-classification"
    assert worker_for(client).run_once() is True
    done = client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}", headers=headers).json()
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert set(result["per_type"]) <= {"LOC", "PER"}
    assert {"precision", "recall", "f1", "n_validation", "token_accuracy"} <= set(result)
    assert 0 <= result["f1"] <= 1
    events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{done['id']}/events?limit=100",
                                               headers=headers).json()["data"]]
    assert any("entity F1" in m for m in events)
    model = done["fine_tuned_model"]
    served = client.post("/v1/entities", json={"model": model, "input": "Anna flew to Oslo",
                                               "aggregation_strategy": "none"}, headers=headers)
    assert served.status_code == 200, served.text
    for item in served.json()["data"][0]["entities"]:
        assert item["entity"] in ("B-PER", "I-PER", "B-LOC", "I-LOC")
    listed = {m["id"]: m for m in client.get("/v1/models", headers=headers).json()["data"]}[model]
    assert (listed["task"], listed["labels"], listed["training_type"]) == (
        "token-classification", ["LOC", "PER"], training_type)
    with services.sessions() as session:
        kinds = sorted(session.exec(select(UsageEvent.kind).where(UsageEvent.tenant_id == tenant_id)).all())
    assert kinds == ["inference", "training"]


def test_a_classification_file_with_a_tokens_key_stays_a_classification_file(client: TestClient,
                                                                              tenant: Any) -> None:
    _, headers = tenant
    rows = [{"text": f"good {i}", "label": "pos", "tokens": 17} for i in range(4)]
    rows += [{"text": f"bad {i}", "label": "neg", "tokens": 9} for i in range(4)]
    body = upload(client, headers, "\n".join(json.dumps(r) for r in rows).encode()).json()
    assert (body["task"], body["labels"]) == ("text-classification", ["neg", "pos"])
