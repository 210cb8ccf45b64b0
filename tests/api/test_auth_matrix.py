"""Every route against every kind of caller: no key, bad key, tenant key on admin, admin token on tenant routes,
a suspended tenant, and the happy path. Routes are read from the app, so new routes are covered automatically."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import services_of
from modelmeter.settings import Settings
from modelmeter.tenancy import keys as auth
from tests.conftest import ADMIN, assert_envelope, bearer

PUBLIC = {"/healthz", "/readyz", "/webhooks/stripe", "/dashboard", "/docs", "/docs/oauth2-redirect",
          "/redoc", "/openapi.json"}


def _routes(settings: Settings) -> list[tuple[str, str]]:
    schema = create_app(settings).openapi()
    return [
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        if path not in PUBLIC
        for method in operations
    ]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The matrix sends hundreds of bad keys from one address: past the throttle they would be 429s."""
    return settings.model_copy(update={"auth_failures_per_minute": 1_000_000})


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x_missing", path)


def _call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    body = {} if method in ("POST", "PATCH", "PUT") else None
    return client.request(method, _concrete(path), json=body, headers=headers)


@pytest.fixture
def callers(client: TestClient, make_tenant: Any, make_key: Any) -> dict[str, dict[str, str]]:
    active = make_tenant()
    suspended = make_tenant()
    active_key = make_key(active["id"])["key"]
    suspended_key = make_key(suspended["id"])["key"]
    client.patch(f"/admin/tenants/{suspended['id']}", json={"status": "suspended"}, headers=ADMIN)
    return {
        "tenant": bearer(active_key),
        "suspended": bearer(suspended_key),
        "unknown": bearer(auth.generate_key()),
        "garbage": bearer("not-a-key"),
        "admin": ADMIN,
        "none": {},
    }


def test_route_inventory_is_not_empty(settings: Settings) -> None:
    paths = {p for _, p in _routes(settings)}
    assert "/admin/tenants" in paths
    assert "/v1/models" in paths


def test_auth_matrix(client: TestClient, settings: Settings, callers: dict[str, dict[str, str]]) -> None:
    for method, path in _routes(settings):
        is_admin = path.startswith("/admin")
        for who in ("none", "unknown", "garbage"):
            assert_envelope(_call(client, method, path, callers[who]), 401, type_="authentication_error")
        if is_admin:
            assert_envelope(_call(client, method, path, callers["tenant"]), 403, type_="permission_error")
            assert_envelope(_call(client, method, path, callers["suspended"]), 403, code="tenant_suspended")
            assert _call(client, method, path, callers["admin"]).status_code not in (401, 403), (method, path)
        else:
            assert_envelope(_call(client, method, path, callers["admin"]), 401, type_="authentication_error")
            assert_envelope(_call(client, method, path, callers["suspended"]), 403, code="tenant_suspended")
            assert _call(client, method, path, callers["tenant"]).status_code not in (401, 403), (method, path)


def test_public_routes_need_no_key(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"] == "ok"


def test_readyz_is_503_when_database_is_gone(tmp_path: Any) -> None:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/db.sqlite", admin_token="mmadmin_x",
                        start_worker=False)
    with TestClient(create_app(settings)) as client:
        services_of(client.app).engine.dispose()
        (tmp_path / "db.sqlite").unlink()
        (tmp_path / "db.sqlite").mkdir()  # a directory where the database file was: unopenable
        assert_envelope(client.get("/readyz"), 503, code="database_unavailable")


def test_models_lists_platform_models(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    key = make_key(make_tenant()["id"])["key"]
    body = client.get("/v1/models", headers=bearer(key)).json()
    assert body["object"] == "list"
    assert body["has_more"] is False
    (model,) = body["data"]
    assert model["id"] == "all-MiniLM-L6-v2"
    assert model["object"] == "model"
    assert model["owned_by"] == "modelmeter"
    assert model["task"] == "feature-extraction"


def test_metrics_take_the_admin_or_the_metrics_token(settings: Settings, make_tenant: Any, make_key: Any,
                                                      client: TestClient) -> None:
    """/metrics names every tenant with its revenue and margin: nobody reads it without a bearer token."""
    tenant_key = make_key(make_tenant()["id"])["key"]
    assert_envelope(client.get("/metrics"), 401, code="missing_api_key")
    assert_envelope(client.get("/metrics", headers=bearer(tenant_key)), 401, code="invalid_api_key")
    assert_envelope(client.get("/metrics", headers=bearer("mmadmin_" + "0" * 40)), 401, code="invalid_api_key")
    assert client.get("/metrics", headers=ADMIN).status_code == 200
    metrics_token = "m" * 40
    with TestClient(create_app(settings.model_copy(update={"metrics_token": metrics_token}))) as other:
        assert other.get("/metrics", headers=bearer(metrics_token)).status_code == 200
        assert other.get("/metrics", headers=ADMIN).status_code == 200
        assert_envelope(other.get("/metrics", headers=bearer(metrics_token + "x")), 401)


def test_no_page_loads_scripts_from_elsewhere(client: TestClient) -> None:
    """FastAPI's /docs and /redoc loaded unpinned scripts from a CDN into the gateway's origin: they are off."""
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    assert client.get("/openapi.json").status_code == 200


def test_failed_authentications_are_throttled_per_address(settings: Settings, make_tenant: Any,
                                                         make_key: Any) -> None:
    """The attack (issue 21): failed authentication was never throttled, so keys could be guessed at full speed,
    each guess a database lookup. Past the limit an address gets 429 before any lookup; valid keys still work."""
    with TestClient(create_app(settings.model_copy(update={"auth_failures_per_minute": 5}))) as small:
        tenant = small.post("/admin/tenants", json={"name": "T", "email": "t@example.com", "plan": "payg"},
                            headers=ADMIN).json()["id"]
        good = small.post(f"/admin/tenants/{tenant}/keys", json={}, headers=ADMIN).json()["key"]
        assert small.get("/v1/models", headers=bearer(good)).status_code == 200  # cached
        for _ in range(5):
            assert_envelope(small.get("/v1/models", headers=bearer(auth.generate_key())), 401)
        throttled = small.get("/v1/models", headers=bearer(auth.generate_key()))
        assert_envelope(throttled, 429, code="too_many_failed_authentications")
        assert 1 <= int(throttled.headers["Retry-After"]) <= 60
        assert_envelope(small.get("/admin/tenants", headers=bearer("mmadmin_" + "9" * 40)), 429,
                        code="too_many_failed_authentications")
        assert small.get("/v1/models", headers=bearer(good)).status_code == 200  # a valid key is never held
        assert small.get("/admin/tenants", headers=ADMIN).status_code == 200
