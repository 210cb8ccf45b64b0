"""The API-key life cycle: create, use, list without the secret, scopes, roll with grace, revoke, expire."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from modelmeter import clock
from modelmeter.gateway.auth import INVALID_KEY_MESSAGE
from modelmeter.gateway.services import Services
from modelmeter.tenancy import keys
from tests.conftest import ADMIN, FakeClock, assert_envelope, bearer


def test_key_format_and_listing_hides_secret(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    tenant = make_tenant()
    created = make_key(tenant["id"], name="ci")
    key = created["key"]
    assert key.startswith("mm_")
    assert len(key) == 41
    assert keys.well_formed(key)
    assert created["prefix"] == key[:11]
    assert created["last4"] == key[-4:]
    assert created["scopes"] == ["inference", "fine-tune", "billing:read", "billing:write"]

    listing = client.get(f"/admin/tenants/{tenant['id']}/keys", headers=ADMIN)
    assert listing.status_code == 200
    assert key not in listing.text
    assert "key_hash" not in listing.text
    (item,) = listing.json()["data"]
    assert "key" not in item
    assert item["status"] == "active"


def test_key_works_and_last_used_is_buffered(client: TestClient, make_tenant: Any, make_key: Any,
                                             services: Services) -> None:
    tenant = make_tenant()
    created = make_key(tenant["id"])
    assert client.get("/v1/models", headers=bearer(created["key"])).status_code == 200
    with services.engine.connect() as conn:
        stored = conn.execute(text("SELECT last_used_at FROM api_key WHERE id = :i"), {"i": created["id"]}).scalar()
    assert stored is None  # no write on the request path
    item = client.get(f"/admin/tenants/{tenant['id']}/keys", headers=ADMIN).json()["data"][0]
    assert item["last_used_at"] is not None
    assert item["last_used_at"] >= created["created"]


def test_scopes_are_enforced(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    tenant = make_tenant()
    billing_only = make_key(tenant["id"], scopes=["billing:read"])
    assert billing_only["scopes"] == ["billing:read"]
    response = client.get("/v1/models", headers=bearer(billing_only["key"]))
    assert response.status_code == 200  # listing models needs only a valid key
    bad = client.post(f"/admin/tenants/{tenant['id']}/keys", json={"scopes": ["root"]}, headers=ADMIN)
    assert_envelope(bad, 422, code="invalid_value")


def test_revoked_key_is_401_at_once(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    tenant = make_tenant()
    created = make_key(tenant["id"])
    assert client.get("/v1/models", headers=bearer(created["key"])).status_code == 200
    revoked = client.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked"
    error = assert_envelope(client.get("/v1/models", headers=bearer(created["key"])), 401, code="invalid_api_key")
    assert error["message"] == INVALID_KEY_MESSAGE


def test_expiry(client: TestClient, make_tenant: Any, make_key: Any, fake_clock: FakeClock) -> None:
    tenant = make_tenant()
    created = make_key(tenant["id"], expires_at=clock.now_s() + 60)
    assert client.get("/v1/models", headers=bearer(created["key"])).status_code == 200
    fake_clock.advance(61)
    error = assert_envelope(client.get("/v1/models", headers=bearer(created["key"])), 401)
    assert error["message"] == INVALID_KEY_MESSAGE
    listed = client.get(f"/admin/tenants/{tenant['id']}/keys", headers=ADMIN).json()["data"][0]
    assert listed["status"] == "expired"


def test_roll_with_grace(client: TestClient, make_tenant: Any, make_key: Any, fake_clock: FakeClock) -> None:
    tenant = make_tenant()
    old = make_key(tenant["id"], name="prod", scopes=["inference"])
    rolled = client.post(f"/admin/keys/{old['id']}/roll", json={"grace_period_seconds": 300}, headers=ADMIN)
    assert rolled.status_code == 201, rolled.text
    new = rolled.json()
    assert new["key"] != old["key"]
    assert new["name"] == "prod"
    assert new["scopes"] == ["inference"]
    for key in (old["key"], new["key"]):
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    fake_clock.advance(301)
    assert_envelope(client.get("/v1/models", headers=bearer(old["key"])), 401)
    assert client.get("/v1/models", headers=bearer(new["key"])).status_code == 200
    statuses = {k["id"]: (k["status"], k["rolled_to"]) for k in
                client.get(f"/admin/tenants/{tenant['id']}/keys", headers=ADMIN).json()["data"]}
    assert statuses == {old["id"]: ("expired", new["id"]), new["id"]: ("active", None)}
    assert_envelope(client.post(f"/admin/keys/{old['id']}/roll", headers=ADMIN), 409)


@pytest.mark.parametrize("mutate", ["flip_char", "truncate", "wrong_prefix", "garbage", "checksum"])
def test_malformed_keys_are_refused_without_lookup(
    client: TestClient, make_tenant: Any, make_key: Any, monkeypatch: pytest.MonkeyPatch, mutate: str
, services: Services) -> None:
    key = make_key(make_tenant()["id"])["key"]
    bad = {
        "flip_char": key[:10] + ("A" if key[10] != "A" else "B") + key[11:],
        "truncate": key[:-1],
        "wrong_prefix": "sk" + key[2:],
        "garbage": "hello world",
        "checksum": key[:-6] + ("000000" if key[-6:] != "000000" else "111111"),
    }[mutate]
    lookups: list[str] = []
    original = services.auth.load
    monkeypatch.setattr(services.auth, "load", lambda k: lookups.append(k) or original(k))
    error = assert_envelope(client.get("/v1/models", headers=bearer(bad)), 401)
    assert error["message"] == INVALID_KEY_MESSAGE
    assert lookups == []


def test_unknown_well_formed_key_is_401(client: TestClient) -> None:
    error = assert_envelope(client.get("/v1/models", headers=bearer(keys.generate_key())), 401)
    assert error["message"] == INVALID_KEY_MESSAGE


def test_key_in_query_string_is_refused(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    key = make_key(make_tenant()["id"])["key"]
    assert_envelope(client.get(f"/v1/models?api_key={key}"), 401, code="key_in_query")
    assert_envelope(client.get(f"/v1/models?key={key}", headers=bearer(key)), 401, code="key_in_query")


def test_plaintext_key_is_nowhere_in_database_or_logs(
    client: TestClient, make_tenant: Any, make_key: Any, caplog: pytest.LogCaptureFixture
, services: Services) -> None:
    caplog.set_level(logging.DEBUG)
    tenant = make_tenant()
    created = make_key(tenant["id"])
    key = created["key"]
    client.get("/v1/models", headers=bearer(key))
    client.get(f"/v1/models?api_key={key}")
    rolled = client.post(f"/admin/keys/{created['id']}/roll", headers=ADMIN).json()["key"]
    client.get("/v1/models", headers=bearer(rolled + "x"))
    client.get(f"/admin/tenants/{tenant['id']}/keys", headers=ADMIN)

    # The test's own HTTP client logs the URLs it requests; everything else is the server's.
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "/v1/models" in server_log  # the access log is captured
    for secret in (key, rolled, key[3:], rolled[3:]):
        assert secret not in server_log
    dump = []
    with services.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                dump.append(" ".join(str(v) for v in row))
    everything = "\n".join(dump)
    assert created["id"] in everything  # the dump is real
    for secret in (key, rolled, key[3:], rolled[3:]):
        assert secret not in everything
