"""Content types as people send them: a JSON body with no Content-Type or with curl's default form type is read as
JSON; any other declared type is 415 naming the type expected, and writes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN, assert_envelope, bearer

BODY = json.dumps({"name": "Curl", "email": "curl@example.com", "plan": "free"})


def _tenants(client: TestClient) -> int:
    return len(client.get("/admin/tenants", headers=ADMIN).json()["data"])


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "application/json",
                                          "application/json; charset=utf-8", "application/merge-patch+json"])
def test_a_json_body_is_read_however_it_is_declared(client: TestClient, content_type: str | None) -> None:
    headers = dict(ADMIN) | ({"Content-Type": content_type} if content_type else {})
    response = client.post("/admin/tenants", content=BODY, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "Curl"


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data; boundary=x"])
def test_another_declared_type_is_415_naming_json_and_writes_nothing(client: TestClient, content_type: str) -> None:
    before = _tenants(client)
    response = client.post("/admin/tenants", content=BODY, headers=dict(ADMIN) | {"Content-Type": content_type})
    error = assert_envelope(response, 415, code="unsupported_media_type")
    assert "application/json" in error["message"]
    assert error["param"] == "Content-Type"
    assert _tenants(client) == before


def test_a_form_body_that_is_not_json_is_400(client: TestClient) -> None:
    headers = dict(ADMIN) | {"Content-Type": "application/x-www-form-urlencoded"}
    response = client.post("/admin/tenants", content="name=Curl&email=curl%40example.com", headers=headers)
    assert_envelope(response, 400)


def test_a_file_upload_must_be_multipart(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    key = make_key(make_tenant()["id"])["key"]
    response = client.post("/v1/files", content=b'{"purpose": "fine-tune"}', headers=bearer(key))
    error = assert_envelope(response, 415, code="unsupported_media_type")
    assert "multipart/form-data" in error["message"]
    assert client.get("/v1/files", headers=bearer(key)).json()["data"] == []


def test_the_caller_is_authenticated_before_the_type_is_refused(client: TestClient) -> None:
    response = client.post("/admin/tenants", content=BODY, headers={"Content-Type": "text/plain"})
    assert_envelope(response, 401)


def test_reads_and_bodiless_posts_need_no_content_type(client: TestClient) -> None:
    assert client.get("/admin/tenants", headers=ADMIN).status_code == 200
    tenant = client.post("/admin/tenants", content=BODY, headers=ADMIN).json()
    key = client.post(f"/admin/tenants/{tenant['id']}/keys", headers=ADMIN)  # no body at all
    assert key.status_code == 201, key.text
