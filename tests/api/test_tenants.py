"""Tenants through the admin API: create, list, show, update, and every refusal in the envelope."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN, assert_envelope


def test_create_show_list_update(client: TestClient, make_tenant: Any) -> None:
    created = make_tenant(name="Acme", email="ops@acme.test", plan="pro")
    assert created["id"].startswith("ten_")
    assert created["object"] == "tenant"
    assert (created["status"], created["billing_status"], created["plan"]) == ("active", "ok", "pro")
    assert isinstance(created["created"], int)

    shown = client.get(f"/admin/tenants/{created['id']}", headers=ADMIN).json()
    assert shown == created

    patched = client.patch(
        f"/admin/tenants/{created['id']}",
        json={"plan": "payg", "status": "suspended", "rpm_limit": 10, "monthly_budget_cents": 500},
        headers=ADMIN,
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    changed = (body["plan"], body["status"], body["rpm_limit"], body["monthly_budget_cents"])
    assert changed == ("payg", "suspended", 10, 500)

    listed = client.get("/admin/tenants", headers=ADMIN).json()
    assert listed["object"] == "list"
    assert listed["has_more"] is False
    assert [t["id"] for t in listed["data"]] == [created["id"]]


def test_list_paginates_newest_first(client: TestClient, make_tenant: Any) -> None:
    ids = [make_tenant()["id"] for _ in range(5)]
    first = client.get("/admin/tenants?limit=2", headers=ADMIN).json()
    assert [t["id"] for t in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    rest = client.get(f"/admin/tenants?limit=10&after={first['data'][-1]['id']}", headers=ADMIN).json()
    assert [t["id"] for t in rest["data"]] == ids[::-1][2:]
    assert rest["has_more"] is False


def test_unknown_tenant_is_404(client: TestClient) -> None:
    assert_envelope(client.get("/admin/tenants/ten_nope", headers=ADMIN), 404, type_="not_found_error")
    assert_envelope(client.patch("/admin/tenants/ten_nope", json={"plan": "pro"}, headers=ADMIN), 404)


def test_an_unknown_tenant_is_404_before_its_new_plan_is_checked(client: TestClient) -> None:
    response = client.patch("/admin/tenants/ten_missing", json={"plan": "gold"}, headers=ADMIN)
    assert_envelope(response, 404)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"name": "A", "email": "a@b.co", "plan": "gold"}, "plan", "unknown_plan"),
        ({"name": "A", "email": "a@b.co", "plan": "free", "id": "ten_mine"}, "id", "unknown_field"),
        ({"name": "A", "email": "a@b.co", "plan": "free", "status": "active"}, "status", "unknown_field"),
        ({"name": "A", "email": "a@b.co", "plan": "free", "colour": "red"}, "colour", "unknown_field"),
        ({"name": 5, "email": "a@b.co", "plan": "free"}, "name", "invalid_value"),
        ({"name": "A", "email": "not-an-email", "plan": "free"}, "email", "invalid_value"),
        ({"email": "a@b.co", "plan": "free"}, "name", "invalid_value"),
        ({"name": "", "email": "a@b.co", "plan": "free"}, "name", "invalid_value"),
    ],
)
def test_create_refusals_write_nothing(client: TestClient, body: dict[str, Any], param: str, code: str) -> None:
    error = assert_envelope(client.post("/admin/tenants", json=body, headers=ADMIN), 422, code=code)
    assert error["param"] == param
    assert client.get("/admin/tenants", headers=ADMIN).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"rpm_limit": 0}, "rpm_limit"),
        ({"tpm_limit": 10**12}, "tpm_limit"),
        ({"monthly_budget_cents": -5}, "monthly_budget_cents"),
        ({"monthly_budget_cents": "lots"}, "monthly_budget_cents"),
        ({"status": "deleted"}, "status"),
        ({"plan": "platinum"}, "plan"),
        ({"id": "ten_x"}, "id"),
        ({"created": 1}, "created"),
    ],
)
def test_update_refusals_change_nothing(client: TestClient, make_tenant: Any, body: dict[str, Any], param: str) -> None:
    tenant = make_tenant()
    error = assert_envelope(client.patch(f"/admin/tenants/{tenant['id']}", json=body, headers=ADMIN), 422)
    assert error["param"] == param
    assert client.get(f"/admin/tenants/{tenant['id']}", headers=ADMIN).json() == tenant


@pytest.mark.parametrize("field", ["name", "email", "plan", "status", "billing_status"])
def test_explicit_null_for_a_required_field_is_422_naming_it(client: TestClient, make_tenant: Any, field: str) -> None:
    tenant = make_tenant()
    error = assert_envelope(client.patch(f"/admin/tenants/{tenant['id']}", json={field: None}, headers=ADMIN), 422)
    assert error["param"] == field
    assert client.get(f"/admin/tenants/{tenant['id']}", headers=ADMIN).json() == tenant


def test_null_limits_mean_the_plans_own(client: TestClient, make_tenant: Any) -> None:
    tenant = make_tenant()
    url = f"/admin/tenants/{tenant['id']}"
    assert client.patch(url, json={"rpm_limit": 5}, headers=ADMIN).json()["rpm_limit"] == 5
    assert client.patch(url, json={"rpm_limit": None}, headers=ADMIN).json()["rpm_limit"] is None


@pytest.mark.parametrize("expires_at", [2**31, 2**63, 2**64 + 1])
def test_a_key_expiry_beyond_what_the_database_holds_is_422(client: TestClient, make_tenant: Any,
                                                             expires_at: int) -> None:
    tenant = make_tenant()
    url = f"/admin/tenants/{tenant['id']}/keys"
    error = assert_envelope(client.post(url, json={"expires_at": expires_at}, headers=ADMIN), 422)
    assert error["param"] == "expires_at"
    assert client.get(url, headers=ADMIN).json()["data"] == []


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/admin/tenants", content=b'{"name": "A",', headers={**ADMIN, "content-type": "application/json"}
    )
    assert_envelope(response, 400, type_="invalid_request_error", code="malformed_request")


@pytest.mark.parametrize("body", [["a"], [None, None], "text", 3, None])
def test_a_body_that_is_json_but_not_an_object_is_422(client: TestClient, body: Any) -> None:
    response = client.post("/admin/tenants", content=json.dumps(body).encode(),
                           headers={**ADMIN, "content-type": "application/json"})
    assert_envelope(response, 422, code="invalid_body")
    assert client.get("/admin/tenants", headers=ADMIN).json()["data"] == []


def test_non_utf8_body_is_refused(client: TestClient) -> None:
    response = client.post(
        "/admin/tenants", content=b'{"name": "\xff\xfe"}', headers={**ADMIN, "content-type": "application/json"}
    )
    assert response.status_code in (400, 422)
    assert_envelope(response, response.status_code)


def test_oversized_body_is_413_before_parsing(client: TestClient) -> None:
    big = b'{"name": "' + b"a" * (1024 * 1024 + 10) + b'"}'
    response = client.post("/admin/tenants", content=big, headers={**ADMIN, "content-type": "application/json"})
    assert_envelope(response, 413, code="request_too_large")


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    def chunks() -> Any:
        for _ in range(20):
            yield b"a" * 65536

    response = client.post("/admin/tenants", content=chunks(), headers={**ADMIN, "content-type": "application/json"})
    assert_envelope(response, 413, code="request_too_large")
    assert client.get("/admin/tenants", headers=ADMIN).json()["data"] == []


def test_unknown_route_and_method_use_envelope(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nothing-here"), 404, type_="not_found_error")
    assert_envelope(client.delete("/healthz"), 405)


def test_plans_catalog(client: TestClient) -> None:
    body = client.get("/admin/plans", headers=ADMIN).json()
    assert body["object"] == "list"
    ids = [p["id"] for p in body["data"]]
    assert {"free", "payg", "pro"} <= set(ids)
    payg = next(p for p in body["data"] if p["id"] == "payg")
    assert isinstance(payg["price_per_1k_tokens"], str)
    assert payg["price_per_1k_tokens"] == "0.0200"
    assert isinstance(payg["base_fee_cents"], int)


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("put", "/v1/files", "GET, POST"),
    ("post", "/v1/files/file_x", "DELETE, GET"),
    ("delete", "/admin/tenants", "GET, POST"),
    ("get", "/v1/classify", "POST"),
])
def test_405_allows_every_method_of_the_path(client: TestClient, method: str, path: str, allow: str) -> None:
    response = client.request(method.upper(), path, headers=ADMIN)
    assert_envelope(response, 405, code="method_not_allowed")
    assert response.headers["allow"] == allow


def test_text_postgresql_cannot_hold_is_a_client_error_and_changes_nothing(client: TestClient) -> None:
    from tests.conftest import ON_POSTGRES

    body = {"name": "Nul\u0000Corp", "email": "nul@example.com", "plan": "payg"}
    response = client.post("/admin/tenants", json=body, headers=ADMIN)
    if ON_POSTGRES:  # PostgreSQL holds no NUL in text: refused, nothing written
        assert_envelope(response, 400, code="invalid_text")
        assert client.get("/admin/tenants", headers=ADMIN).json()["data"] == []
    else:  # SQLite stores it as given
        assert response.status_code == 201
        assert response.json()["name"] == body["name"]
