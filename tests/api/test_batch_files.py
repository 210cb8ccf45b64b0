"""Batch input files (``purpose="batch"``): validated line by line at upload, errors naming the line, nothing stored
on refusal; their bytes come back from ``GET /v1/files/{id}/content``; a job cannot train on one."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelmeter.gateway.services import services_of
from modelmeter.models.batchfile import MAX_CUSTOM_ID
from tests.conftest import assert_envelope, bearer
from tests.support.fine_tuning import create_job, upload


def _line(custom_id: str = "t-1", url: str = "/v1/classify", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": "m", "input": "great product", **body}}


def _jsonl(*lines: object) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def _upload_batch(client: TestClient, headers: dict[str, str], data: bytes) -> Any:
    return client.post("/v1/files", files={"file": ("batch.jsonl", data)}, data={"purpose": "batch"},
                       headers=headers)


def _stored_files(client: TestClient) -> int:
    data_dir = services_of(client.app).settings.data_dir
    return sum(1 for p in (data_dir / "files").rglob("*") if p.is_file()) if (data_dir / "files").exists() else 0


def test_a_batch_file_is_stored_and_read_back(client: TestClient, tenant: tuple[str, dict[str, str]]) -> None:
    _, headers = tenant
    data = _jsonl(_line("a"), _line("b", "/v1/embeddings", encoding_format="base64"),
                  _line("c", "/v1/entities", input=["Maria Lopez works at Acme", "Paris"]), b"")
    created = _upload_batch(client, headers, data)
    assert created.status_code == 200, created.text
    body = created.json()
    assert (body["purpose"], body["rows"], body["task"]) == ("batch", 3, None)
    assert body["labels"] == ["/v1/classify", "/v1/embeddings", "/v1/entities"]  # the routes its lines call
    content = client.get(f"/v1/files/{body['id']}/content", headers=headers)
    assert content.status_code == 200
    assert content.content == data  # byte for byte, as uploaded
    listed = client.get("/v1/files", params={"purpose": "batch"}, headers=headers).json()["data"]
    assert [f["id"] for f in listed] == [body["id"]]


@pytest.mark.parametrize(("lines", "where"), [
    ([_line("a"), _line("a")], "line 2: custom_id 'a' repeats line 1"),
    ([_line("a"), _line("b", url="/v1/fine_tuning/jobs")], "line 2: 'url' must be one of"),
    ([_line("a"), {**_line("b"), "method": "GET"}], "line 2: 'method' must be \"POST\""),
    ([_line("a", extra=1)], "line 1: body.extra: Extra inputs are not permitted"),
    ([_line("a", input=[])], "line 1: body.input"),
    ([_line("a", input=7)], "line 1: body.input"),
    ([{**_line("a"), "header": {}}], "line 1: unknown field 'header'"),
    ([{"custom_id": "a", "method": "POST", "url": "/v1/classify"}], "line 1: missing 'body'"),
    ([_line("x" * (MAX_CUSTOM_ID + 1))], "line 1: 'custom_id' must be"),
    ([_line("a"), b"{not json"], "line 2: malformed JSON"),
    ([_line("a"), b"[1, 2]"], "line 2: expected a JSON object"),
    ([_line("a"), b"\xff\xfe"], "line 2: not valid UTF-8"),
    ([b"", b"  "], "file is empty"),
])
def test_bad_lines_are_refused_naming_the_line_and_nothing_is_stored(
        client: TestClient, tenant: tuple[str, dict[str, str]], lines: list[object], where: str) -> None:
    _, headers = tenant
    before = _stored_files(client)
    error = assert_envelope(_upload_batch(client, headers, _jsonl(*lines)), 422, code="invalid_file")
    assert where in error["message"], error["message"]
    assert error["param"] == "file"
    assert _stored_files(client) == before
    assert client.get("/v1/files", headers=headers).json()["data"] == []


def test_bounds_hold_before_any_line_is_stored(client: TestClient, tenant: tuple[str, dict[str, str]]) -> None:
    _, headers = tenant
    settings = services_of(client.app).settings
    too_many_inputs = _line("a", input=["x"] * (settings.max_inputs_per_request + 1))
    error = assert_envelope(_upload_batch(client, headers, _jsonl(too_many_inputs)), 422, code="invalid_file")
    assert f"at most {settings.max_inputs_per_request} inputs" in error["message"]
    too_long = _line("a", input="x" * (settings.max_text_chars + 1))
    error = assert_envelope(_upload_batch(client, headers, _jsonl(too_long)), 422, code="invalid_file")
    assert f"over {settings.max_text_chars} characters" in error["message"]


def test_the_line_cap_names_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelmeter.models import batchfile
    from modelmeter.models.finetune.dataset import DatasetError

    data = _jsonl(*(_line(f"id-{i}") for i in range(4)))
    assert len(batchfile.parse_batch_file(data, max_inputs=8, max_text_chars=100, max_lines=4).lines) == 4
    with pytest.raises(DatasetError, match="more than 3 requests"):
        batchfile.parse_batch_file(data, max_inputs=8, max_text_chars=100, max_lines=3)


def test_content_of_another_tenants_file_is_not_found(client: TestClient, tenant: tuple[str, dict[str, str]],
                                                      make_tenant: Any, make_key: Any) -> None:
    _, headers = tenant
    file_id = _upload_batch(client, headers, _jsonl(_line("a"))).json()["id"]
    other = make_tenant()
    other_headers = bearer(make_key(other["id"])["key"])
    assert_envelope(client.get(f"/v1/files/{file_id}/content", headers=other_headers), 404, code="file_not_found")
    assert_envelope(client.get("/v1/files/file_nosuch/content", headers=headers), 404, code="file_not_found")


def test_a_job_cannot_train_on_a_batch_file(client: TestClient, tenant: tuple[str, dict[str, str]], base: str) -> None:
    _, headers = tenant
    batch_id = _upload_batch(client, headers, _jsonl(_line("a"))).json()["id"]
    error = assert_envelope(create_job(client, headers, batch_id, base), 422, code="invalid_training_file")
    assert "purpose \"batch\"" in error["message"]
    rows = b"".join(json.dumps({"text": f"row {i}", "label": "pos" if i % 2 else "neg"}).encode() + b"\n"
                    for i in range(20))
    training_id = upload(client, headers, rows).json()["id"]
    error = assert_envelope(create_job(client, headers, training_id, base, validation_file=batch_id), 422,
                            code="invalid_validation_file")
    assert "purpose \"batch\"" in error["message"]
    assert client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"] == []


def test_a_files_purpose_decides_the_scope_its_routes_need(client: TestClient, make_tenant: Any,
                                                           make_key: Any) -> None:
    """An ``inference`` key runs batches end to end (its files up and down) but never touches training data; a
    ``fine-tune`` key the reverse. Another tenant's file stays a 404 whatever the scope."""
    tenant_id = make_tenant()["id"]
    full = bearer(make_key(tenant_id)["key"])
    inference = bearer(make_key(tenant_id, scopes=["inference"])["key"])
    fine_tune = bearer(make_key(tenant_id, scopes=["fine-tune"])["key"])
    training = upload(client, full, _jsonl({"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}))
    assert training.status_code == 200, training.text
    batch = _upload_batch(client, inference, _jsonl(_line("a")))
    assert batch.status_code == 200, batch.text
    training_id, batch_id = training.json()["id"], batch.json()["id"]

    assert client.get(f"/v1/files/{batch_id}/content", headers=inference).status_code == 200
    assert client.get(f"/v1/files/{batch_id}", headers=inference).status_code == 200
    listed = client.get("/v1/files", headers=inference).json()["data"]
    assert [f["id"] for f in listed] == [batch_id]  # the training file is not shown to an inference key
    for method, path in (("GET", f"/v1/files/{training_id}"), ("GET", f"/v1/files/{training_id}/content"),
                         ("DELETE", f"/v1/files/{training_id}"), ("GET", "/v1/files?purpose=fine-tune")):
        assert_envelope(client.request(method, path, headers=inference), 403, code="insufficient_scope")
    assert upload(client, inference, _jsonl({"text": "x", "label": "y"})).status_code == 403

    assert _upload_batch(client, fine_tune, _jsonl(_line("b"))).status_code == 403
    assert client.get(f"/v1/files/{batch_id}/content", headers=fine_tune).status_code == 403
    assert [f["id"] for f in client.get("/v1/files", headers=fine_tune).json()["data"]] == [training_id]
    assert {f["id"] for f in client.get("/v1/files", headers=full).json()["data"]} == {training_id, batch_id}

    other = bearer(make_key(make_tenant()["id"], scopes=["inference"])["key"])
    assert client.get(f"/v1/files/{training_id}", headers=other).status_code == 404  # not a 403: no existence leak
