"""``Idempotency-Key`` on POSTs: replay, reuse with another request, in flight, retention, scoping, malformed keys,
billing once, concurrency, and what is not kept (non-2xx answers)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from modelmeter import clock
from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.idempotency import fingerprint
from modelmeter.gateway.services import Services, services_of
from modelmeter.tenancy import idempotency as store
from modelmeter.tenancy.idempotency import ADMIN_SCOPE, IdempotencyRecord
from tests.conftest import ADMIN, FakeClock, assert_envelope, bearer
from tests.support.live_server import LiveServer

TENANT = {"name": "Acme", "email": "ops@acme.test", "plan": "payg"}


def keyed(key: str, headers: dict[str, str] = ADMIN) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


def tenant_ids(client: TestClient) -> list[str]:
    return [t["id"] for t in client.get("/admin/tenants", headers=ADMIN).json()["data"]]


def rows(services: Services) -> list[IdempotencyRecord]:
    with services.sessions() as session:
        return list(session.exec(select(IdempotencyRecord)).all())


def test_same_request_replays_the_first_answer(client: TestClient, services: Services) -> None:
    first = client.post("/admin/tenants", json=TENANT, headers=keyed("k-1"))
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    # The same JSON with other whitespace and key order is the same request.
    same = json.dumps(dict(reversed(TENANT.items())), indent=2).encode()
    again = client.post("/admin/tenants", content=same, headers=keyed("k-1"))
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert tenant_ids(client) == [first.json()["id"]]
    assert services.telemetry.registry.get_sample_value("modelmeter_idempotent_replays_total") == 1


def test_same_key_for_another_request_is_422(client: TestClient, services: Services) -> None:
    created = client.post("/admin/tenants", json=TENANT, headers=keyed("k-1")).json()
    other = client.post("/admin/tenants", json={**TENANT, "name": "Other"}, headers=keyed("k-1"))
    error = assert_envelope(other, 422, type_="invalid_request_error", code="idempotency_key_reused")
    assert error["param"] == "Idempotency-Key"
    another_route = client.post(f"/admin/tenants/{created['id']}/keys", json={}, headers=keyed("k-1"))
    assert_envelope(another_route, 422, code="idempotency_key_reused")
    assert tenant_ids(client) == [created["id"]]
    assert client.get(f"/admin/tenants/{created['id']}/keys", headers=ADMIN).json()["data"] == []


def _admin_fingerprint(body: dict[str, Any]) -> str:
    scope = {"method": "POST", "path": "/admin/tenants", "query_string": b"",
             "headers": [(b"content-type", b"application/json")]}
    return fingerprint(scope, json.dumps(body).encode())


def test_in_flight_is_409_until_its_lease_passes(client: TestClient, services: Services,
                                                 fake_clock: FakeClock) -> None:
    settings = services.settings
    held = store.claim(sessions=services.sessions, scope=ADMIN_SCOPE, key="k-1", fingerprint=_admin_fingerprint(TENANT),
                       lock_s=settings.idempotency_lock_s, ttl_s=settings.idempotency_ttl_s)
    assert held.outcome == "claimed"
    busy = client.post("/admin/tenants", json=TENANT, headers=keyed("k-1"))
    error = assert_envelope(busy, 409, type_="conflict_error", code="idempotency_key_in_use")
    assert error["param"] == "Idempotency-Key"
    assert tenant_ids(client) == []

    fake_clock.advance(settings.idempotency_lock_s + 1)  # the holder died: its lease ends and a retry takes over
    taken = client.post("/admin/tenants", json=TENANT, headers=keyed("k-1"))
    assert taken.status_code == 201, taken.text
    assert "idempotent-replayed" not in taken.headers
    # The dead holder can neither overwrite nor delete its successor's answer.
    answer = store.StoredResponse(500, [], b"late")
    assert not store.complete(sessions=services.sessions, scope=ADMIN_SCOPE, key="k-1", claim_id=held.claim_id,
                              response=answer)
    store.release(sessions=services.sessions, scope=ADMIN_SCOPE, key="k-1", claim_id=held.claim_id)
    replay = client.post("/admin/tenants", json=TENANT, headers=keyed("k-1"))
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == taken.json()


def test_a_key_is_kept_24_hours(client: TestClient, services: Services, fake_clock: FakeClock) -> None:
    first = client.post("/admin/tenants", json=TENANT, headers=keyed("k-1")).json()
    fake_clock.advance(services.settings.idempotency_ttl_s - 1)
    assert client.post("/admin/tenants", json=TENANT, headers=keyed("k-1")).headers["idempotent-replayed"] == "true"
    assert store.purge(sessions=services.sessions) == 0
    fake_clock.advance(1)
    fresh = client.post("/admin/tenants", json={**TENANT, "name": "Later"}, headers=keyed("k-1"))  # any body now
    assert fresh.status_code == 201
    assert "idempotent-replayed" not in fresh.headers
    assert sorted(tenant_ids(client)) == sorted([first["id"], fresh.json()["id"]])
    fake_clock.advance(services.settings.idempotency_ttl_s)
    assert store.purge(sessions=services.sessions) == 1
    assert rows(services) == []


def test_keys_are_scoped_to_the_caller(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    a, b = make_tenant()["id"], make_tenant()["id"]
    a1, a2, b1 = make_key(a)["key"], make_key(a)["key"], make_key(b)["key"]
    first = client.post("/v1/dashboard/links", headers=keyed("shared", bearer(a1)))
    assert first.status_code == 200, first.text
    same_key = client.post("/v1/dashboard/links", headers=keyed("shared", bearer(a1)))
    assert same_key.headers["idempotent-replayed"] == "true"
    assert same_key.json() == first.json()
    # Another key of the same tenant is another caller (it may hold other scopes): its own answer.
    same_tenant = client.post("/v1/dashboard/links", headers=keyed("shared", bearer(a2)))
    assert same_tenant.status_code == 200
    assert "idempotent-replayed" not in same_tenant.headers
    other_tenant = client.post("/v1/dashboard/links", headers=keyed("shared", bearer(b1)))
    assert other_tenant.status_code == 200
    assert "idempotent-replayed" not in other_tenant.headers
    assert other_tenant.json()["url"] != first.json()["url"]
    admin = client.post("/admin/tenants", json=TENANT, headers=keyed("shared"))
    assert admin.status_code == 201
    assert "idempotent-replayed" not in admin.headers


def test_a_narrower_key_gets_no_replay_of_a_wider_keys_answer(client: TestClient, make_tenant: Any,
                                                                make_key: Any) -> None:
    """The attack (issue 21): an inference-only key reused the full key's Idempotency-Key and was replayed the
    dashboard link and the purchase answer, both of which answer it 403 directly."""
    tenant = make_tenant()["id"]
    full, narrow = make_key(tenant)["key"], make_key(tenant, scopes=["inference"])["key"]
    link = client.post("/v1/dashboard/links", headers=keyed("stolen", bearer(full)))
    assert link.status_code == 200, link.text
    replayed = client.post("/v1/dashboard/links", headers=keyed("stolen", bearer(narrow)))
    assert_envelope(replayed, 403, code="insufficient_scope")
    assert "idempotent-replayed" not in replayed.headers


def test_an_answer_over_the_cap_is_not_kept_nor_run_again(app_factory: Any, services: Services) -> None:
    """A 2 MB answer was kept 24 h for 768 billed tokens; now past the cap a short 409 is kept in its place."""
    with TestClient(app_factory(idempotency_max_answer_bytes=200)) as small:
        first = small.post("/admin/tenants", json=TENANT, headers=keyed("big"))
        assert first.status_code == 201
        assert len(first.content) > 200
        retry = small.post("/admin/tenants", json=TENANT, headers=keyed("big"))
        assert_envelope(retry, 409, code="idempotency_answer_not_kept")
        assert retry.headers["idempotent-replayed"] == "true"
        assert len(tenant_ids(small)) == 1  # created once
    assert max(len(r.body or b"") for r in rows(services)) < 1000


@pytest.mark.parametrize("value", ["x" * 256, "", "   ", "a\x01b", "tab\there", "del\x7f", b"caf\xc3\xa9"],
                         ids=["256-chars", "empty", "blank", "control", "tab", "del", "non-ascii"])
def test_malformed_key_is_400_and_nothing_is_written(client: TestClient, services: Services, value: Any) -> None:
    response = client.post("/admin/tenants", json=TENANT, headers={**ADMIN, "Idempotency-Key": value})
    error = assert_envelope(response, 400, type_="invalid_request_error", code="invalid_idempotency_key")
    assert error["param"] == "Idempotency-Key"
    assert tenant_ids(client) == []
    assert rows(services) == []


def test_key_limits_repeats_and_unauthenticated_callers(client: TestClient, services: Services) -> None:
    longest = client.post("/admin/tenants", json=TENANT, headers=keyed("x" * 255))
    assert longest.status_code == 201
    twice = client.post("/admin/tenants", json=TENANT, headers=[*ADMIN.items(), ("Idempotency-Key", "a"),
                                                                ("Idempotency-Key", "b")])
    assert_envelope(twice, 400, code="invalid_idempotency_key")
    # A caller without a valid credential learns nothing about its key: the route answers its 401.
    stranger = client.post("/admin/tenants", json=TENANT, headers=keyed("\x01", {"Authorization": "Bearer nope"}))
    assert_envelope(stranger, 401)
    assert len(rows(services)) == 1


def test_a_replayed_inference_is_billed_once(client: TestClient, services: Services, make_tenant: Any,
                                            make_key: Any, register_model: Any) -> None:
    tenant_id = make_tenant()["id"]
    headers = keyed("classify-1", bearer(make_key(tenant_id)["key"]))
    model = register_model(tenant_id)
    body = {"model": model, "input": ["a fine film", "dull"]}
    first = client.post("/v1/classify", json=body, headers=headers)
    again = client.post("/v1/classify", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-compute-tokens"] == first.headers["x-compute-tokens"]
    assert "x-ratelimit-remaining-requests" in first.headers
    assert "x-ratelimit-remaining-requests" not in again.headers  # the first moment's limiter state is not replayed
    with services.sessions() as session:
        ledger = session.exec(select(UsageEvent).where(UsageEvent.tenant_id == tenant_id)).all()
    assert len(ledger) == 1
    usage = client.get(f"/v1/usage?start_time={clock.now_s() - 3600}", headers=headers).json()
    assert sum(r["requests"] for bucket in usage["data"] for r in bucket["results"]) == 1


def test_a_refused_request_is_not_kept(client: TestClient, services: Services, make_tenant: Any, make_key: Any,
                                       register_model: Any) -> None:
    tenant_id = make_tenant()["id"]
    headers = keyed("retry-me", bearer(make_key(tenant_id)["key"]))
    missing = client.post("/v1/classify", json={"model": "no-such-model", "input": "x"}, headers=headers)
    assert_envelope(missing, 404)
    model = register_model(tenant_id)
    fixed = client.post("/v1/classify", json={"model": model, "input": "x"}, headers=headers)
    assert fixed.status_code == 200, fixed.text
    assert "idempotent-replayed" not in fixed.headers

    bad_plan = client.post("/admin/tenants", json={**TENANT, "plan": "nope"}, headers=keyed("admin-retry"))
    assert bad_plan.status_code >= 400
    created = client.post("/admin/tenants", json=TENANT, headers=keyed("admin-retry"))
    assert created.status_code == 201, created.text


def test_multipart_retries_with_a_new_boundary_replay(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    tenant_id = make_tenant()["id"]
    headers = keyed("upload-1", bearer(make_key(tenant_id)["key"]))
    data = b'{"text": "a fine film", "label": "positive"}\n{"text": "dull", "label": "negative"}\n'

    def upload() -> Any:
        return client.post("/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"},
                           headers=headers)

    first, again = upload(), upload()
    assert first.status_code == 200, first.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert len(client.get("/v1/files", headers=headers).json()["data"]) == 1


def test_without_the_header_or_on_the_webhook_nothing_is_stored(client: TestClient, services: Services) -> None:
    assert client.post("/admin/tenants", json=TENANT, headers=ADMIN).status_code == 201
    client.post("/webhooks/stripe", content=b"{}", headers=keyed("hook-1"))
    assert rows(services) == []


def test_a_body_over_the_limit_is_413_and_not_kept(app_factory: Any) -> None:
    with TestClient(app_factory(max_body_bytes=64), raise_server_exceptions=False) as client:
        streamed = client.post("/admin/tenants", content=iter([b"{" + b" " * 100, b"}"]), headers=keyed("big"))
        assert_envelope(streamed, 413)
        assert rows(services_of(client.app)) == []


@pytest.mark.anyio
async def test_concurrent_requests_with_one_key_run_once(live_server: LiveServer, client: TestClient) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as http:
        responses = await asyncio.gather(*(
            http.post("/admin/tenants", json=TENANT, headers=keyed("race")) for _ in range(8)
        ))
    ran = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(ran) == 1
    for response in responses:
        if response.status_code == 201:
            assert response.json() == ran[0].json()
        else:
            assert_envelope(response, 409, code="idempotency_key_in_use")
    assert tenant_ids(client) == [ran[0].json()["id"]]


def test_a_new_api_key_is_replayed_but_never_stored_readable(client: TestClient, services: Services,
                                                             make_tenant: Any) -> None:
    tenant = make_tenant()
    url = f"/admin/tenants/{tenant['id']}/keys"
    first = client.post(url, json={"name": "ci"}, headers=keyed("new-key"))
    again = client.post(url, json={"name": "ci"}, headers=keyed("new-key"))
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    secret = first.json()["key"]
    assert len(client.get(url, headers=ADMIN).json()["data"]) == 1
    (row,) = rows(services)
    assert row.body is not None
    assert secret.encode() not in row.body
    assert first.json()["id"].encode() not in row.body  # the whole body is sealed, not only the secret


def test_an_answer_sealed_under_another_admin_token_is_not_run_again(client: TestClient, services: Services,
                                                                     app_factory: Any) -> None:
    assert client.post("/admin/tenants", json=TENANT, headers=keyed("k-rotated")).status_code == 201
    rotated = "mmadmin_another-token-0123456789"
    with TestClient(app_factory(admin_token=rotated), raise_server_exceptions=False) as other:
        headers = {"Authorization": f"Bearer {rotated}", "Idempotency-Key": "k-rotated"}
        assert_envelope(other.post("/admin/tenants", json=TENANT, headers=headers), 409,
                        code="idempotency_key_unreadable")
    assert len(tenant_ids(client)) == 1
