"""Usage alerts through the API on a controlled clock: thresholds crossed once each, in ascending order, even by one
request; replays, restarts and new periods; signed deliveries retried against a real local receiver; bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from modelmeter.billing.alert_relay import AlertRelay
from modelmeter.billing.alerts import secret_sealer
from modelmeter.billing.tables import AlertDelivery, AlertEvent, AlertSetting
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import Services
from modelmeter.settings import Settings
from tests.conftest import ADMIN, ADMIN_TOKEN, FakeClock, assert_envelope, bearer
from tests.support.alerts import TOKENS_PER_X, Receiver, verify
from tests.support.plans import with_plans

SEALER = secret_sealer(ADMIN_TOKEN)

ALERT_PLANS = [
    # A cent a token, nothing included: spend in cents is the token count.
    {"id": "cent_token", "name": "Cent a token", "price_per_1k_tokens": "10.00", "rpm_limit": 100000,
     "tpm_limit": 100000000},
    # Five "x" included (soft: usage beyond is billed, not refused).
    {"id": "five_x", "name": "Five x", "included_tokens": 5 * TOKENS_PER_X, "price_per_1k_tokens": "0.01",
     "rpm_limit": 100000, "tpm_limit": 100000000},
    # A cent a training token.
    {"id": "train_cent", "name": "Train a cent", "price_per_1m_training_tokens": "10000.00", "rpm_limit": 100000,
     "tpm_limit": 100000000},
]
OCTOBER = 1_790_812_800  # 2026-10-01T00:00:00Z
NOVEMBER = 1_793_491_200  # 2026-11-01T00:00:00Z


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    # The receivers in these tests listen on 127.0.0.1: private URLs are allowed here (refused by default).
    return with_plans(settings, tmp_path, ALERT_PLANS, alerts_relay_interval_s=0, alerts_allow_private_urls=True)


@pytest.fixture
def october(fake_clock: FakeClock) -> FakeClock:
    fake_clock.t = OCTOBER + 3600
    return fake_clock


Tenant = tuple[dict[str, Any], dict[str, str], str]


@pytest.fixture
def on_plan(client: TestClient, make_tenant: Any, make_key: Any, register_model: Any,
            october: FakeClock) -> Callable[..., Tenant]:
    def make(plan: str, **fields: Any) -> Tenant:
        tenant = make_tenant(plan=plan)
        if fields:
            assert client.patch(f"/admin/tenants/{tenant['id']}", json=fields, headers=ADMIN).status_code == 200
        return tenant, bearer(make_key(tenant["id"])["key"]), register_model(tenant["id"])

    return make


def classify(client: TestClient, headers: dict[str, str], model: str, n: int, **extra: str) -> Any:
    response = client.post("/v1/classify", json={"model": model, "input": ["x"] * n}, headers={**headers, **extra})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] == n * TOKENS_PER_X
    return response


def put_alerts(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    return client.put("/v1/billing/alerts", json=body, headers=headers)


def events(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get("/v1/events", headers=headers, params={"limit": 100})
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["data"]))  # oldest first


def crossings(client: TestClient, headers: dict[str, str]) -> list[tuple[str, str, int, int, int]]:
    return [(e["data"]["period"], e["data"]["resource"], e["data"]["threshold_percent"], e["data"]["value"],
             e["data"]["limit"]) for e in events(client, headers)]


def count(services: Services, table: Any) -> int:
    with services.sessions() as session:
        return int(session.exec(select(func.count()).select_from(table)).one())


def test_settings_shape_secret_once(client: TestClient, on_plan: Callable[..., Tenant]) -> None:
    _, headers, _ = on_plan("five_x")
    assert client.get("/v1/billing/alerts", headers=headers).json() == {
        "object": "alert_settings", "thresholds": [], "url": None}
    created = put_alerts(client, headers, thresholds=[50, 80, 100], url="https://example.com/hook")
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["secret"].startswith("whsec_")
    assert len(body["secret"]) > 30
    assert body == {"object": "alert_settings", "thresholds": [50, 80, 100], "url": "https://example.com/hook",
                    "secret": body["secret"]}
    assert client.get("/v1/billing/alerts", headers=headers).json() == {
        "object": "alert_settings", "thresholds": [50, 80, 100], "url": "https://example.com/hook"}


@pytest.mark.parametrize(("body", "param"), [
    ({"thresholds": [50], "url": "ftp://example.com/x"}, "url"),
    ({"thresholds": [50], "url": "example.com/hook"}, "url"),
    ({"thresholds": [50], "url": "javascript:alert(1)"}, "url"),
    ({"thresholds": [0, 50], "url": "https://example.com"}, "thresholds"),
    ({"thresholds": [50, 1001], "url": "https://example.com"}, "thresholds"),
    ({"thresholds": [80, 50], "url": "https://example.com"}, "thresholds"),
    ({"thresholds": [50, 50], "url": "https://example.com"}, "thresholds"),
    ({"thresholds": [], "url": "https://example.com"}, "thresholds"),
    ({"thresholds": ["50"], "url": "https://example.com"}, "thresholds"),
    ({"thresholds": list(range(1, 13)), "url": "https://example.com"}, "thresholds"),
    ({"thresholds": [50], "url": "https://example.com", "email": "a@b.c"}, "email"),
    ({"url": "https://example.com"}, "thresholds"),
])
def test_bad_settings_are_refused_and_write_nothing(client: TestClient, on_plan: Callable[..., Tenant],
                                                    services: Services, body: dict[str, Any], param: str) -> None:
    _, headers, _ = on_plan("five_x")
    error = assert_envelope(client.put("/v1/billing/alerts", json=body, headers=headers), 422)
    assert param in (error["param"] or ""), error
    assert count(services, AlertSetting) == 0


def test_read_only_key_cannot_set_alerts(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    tenant = make_tenant(plan="five_x")
    key = make_key(tenant["id"], scopes=["billing:read"])["key"]
    assert_envelope(put_alerts(client, bearer(key), thresholds=[50], url="https://example.com"), 403)


def test_one_request_from_40_to_120_percent_fires_50_80_100_in_order(
        client: TestClient, on_plan: Callable[..., Tenant], services: Services) -> None:
    _, headers, model = on_plan("five_x")
    assert put_alerts(client, headers, thresholds=[30, 50, 80, 100, 150], url="https://example.com").status_code == 200
    classify(client, headers, model, 2)  # 40% of the included tokens: 30 fires
    assert [c[2] for c in crossings(client, headers)] == [30]
    classify(client, headers, model, 4)  # 120%
    included = 5 * TOKENS_PER_X
    assert crossings(client, headers) == [("2026-10", "included_tokens", 30, 2 * TOKENS_PER_X, included)] + [
        ("2026-10", "included_tokens", t, 6 * TOKENS_PER_X, included) for t in (50, 80, 100)]
    listed = events(client, headers)
    assert [e["id"] for e in listed] == sorted(e["id"] for e in listed)
    assert all(e["object"] == "event" and e["type"] == "usage.threshold_crossed" for e in listed)
    assert count(services, AlertDelivery) == 4  # one delivery per event, written with it


def test_thresholds_set_below_what_is_spent_fire_with_the_next_usage(
        client: TestClient, on_plan: Callable[..., Tenant]) -> None:
    """A threshold fires once usage has reached it, not only when one commit group crosses it: thresholds set at
    60% when 80% is spent fire (once) with the next request, and never again this period."""
    _, headers, model = on_plan("five_x")
    classify(client, headers, model, 4)  # 80% before any alert exists: nothing to fire
    put_alerts(client, headers, thresholds=[50, 60, 100], url="https://example.com")
    assert crossings(client, headers) == []
    classify(client, headers, model, 1)  # 100%: 50 and 60 catch up, 100 is crossed
    included = 5 * TOKENS_PER_X
    assert crossings(client, headers) == [("2026-10", "included_tokens", t, included, included) for t in (50, 60, 100)]
    classify(client, headers, model, 1)
    assert len(crossings(client, headers)) == 3


def test_budget_thresholds_use_the_exact_usage_cost(client: TestClient, on_plan: Callable[..., Tenant]) -> None:
    budget = 5 * TOKENS_PER_X  # cents: five "x" at a cent a token
    _, headers, model = on_plan("cent_token", monthly_budget_cents=budget)
    put_alerts(client, headers, thresholds=[50, 80, 100], url="https://example.com")
    classify(client, headers, model, 2)  # 40%
    assert crossings(client, headers) == []
    classify(client, headers, model, 3)  # 100%: the budget admits exactly this much
    assert crossings(client, headers) == [("2026-10", "budget", t, budget, budget) for t in (50, 80, 100)]


def test_replay_restart_and_new_period(client: TestClient, on_plan: Callable[..., Tenant], settings: Settings,
                                       october: FakeClock) -> None:
    _, headers, model = on_plan("five_x")
    put_alerts(client, headers, thresholds=[50, 100], url="https://example.com")
    first = classify(client, headers, model, 3, **{"Idempotency-Key": "cross-50"})  # 60%
    assert [c[2] for c in crossings(client, headers)] == [50]
    replay = classify(client, headers, model, 3, **{"Idempotency-Key": "cross-50"})
    assert replay.headers.get("idempotent-replayed") == "true"
    assert replay.json() == first.json()
    assert [c[2] for c in crossings(client, headers)] == [50]
    with TestClient(create_app(settings), raise_server_exceptions=False) as restarted:  # a restarted gateway
        classify(restarted, headers, model, 1)  # 80%: nothing crossed, nothing refired
        assert [c[2] for c in crossings(restarted, headers)] == [50]
        classify(restarted, headers, model, 2)  # 120%
        assert [c[2] for c in crossings(restarted, headers)] == [50, 100]
    october.t = NOVEMBER + 60
    classify(client, headers, model, 3)
    assert [(c[0], c[2]) for c in crossings(client, headers)] == [("2026-10", 50), ("2026-10", 100), ("2026-11", 50)]


def test_events_are_private_and_paginated(client: TestClient, on_plan: Callable[..., Tenant]) -> None:
    _, headers, model = on_plan("five_x")
    _, other, other_model = on_plan("five_x")
    put_alerts(client, headers, thresholds=[10, 20, 30, 40, 50], url="https://example.com")
    classify(client, headers, model, 3)  # 60%: all five
    assert events(client, other) == []
    page = client.get("/v1/events", headers=headers, params={"limit": 2}).json()
    assert [e["data"]["threshold_percent"] for e in page["data"]] == [50, 40]
    assert page["has_more"]
    rest = client.get("/v1/events", headers=headers, params={"limit": 5, "after": page["data"][-1]["id"]}).json()
    assert [e["data"]["threshold_percent"] for e in rest["data"]] == [30, 20, 10]
    assert not rest["has_more"]
    classify(client, other, other_model, 1)
    assert events(client, other) == []  # no settings: nothing fires


# --- delivery ---------------------------------------------------------------------------------------------


def test_receiver_failing_twice_gets_each_event_once_signed(
        client: TestClient, on_plan: Callable[..., Tenant], services: Services, october: FakeClock,
        receiver: Callable[[list[int | str]], Receiver]) -> None:
    hook = receiver([500, "hang", 200])
    _, headers, model = on_plan("five_x")
    secret = put_alerts(client, headers, thresholds=[50], url=hook.url).json()["secret"]
    classify(client, headers, model, 3)
    [event] = events(client, headers)
    relay = AlertRelay(sessions=services.sessions, timeout_s=0.3, backoff_base_s=10, max_attempts=5, sealer=SEALER,
                       allow_private=True)
    assert [o.result for o in relay.run_once().rows] == ["retry"]  # 500
    assert relay.run_once().rows == []  # backing off
    october.advance(10)
    assert [o.result for o in relay.run_once().rows] == ["retry"]  # timeout
    october.advance(19)
    assert relay.run_once().rows == []  # 20 s this time
    october.advance(1)
    assert [o.result for o in relay.run_once().rows] == ["done"]
    october.advance(3600)
    assert relay.run_once().rows == []  # done is done
    assert len(hook.received) == 3
    for sent_headers, body in hook.received:
        assert json.loads(body) == event  # the same event, the same id, every attempt
        verify(secret, sent_headers, body)
    with services.sessions() as session:
        [delivery] = session.exec(select(AlertDelivery)).all()
        assert (delivery.status, delivery.attempts, delivery.event_id) == ("done", 3, event["id"])


def test_deliveries_that_keep_failing_are_marked_and_listed(
        client: TestClient, on_plan: Callable[..., Tenant], services: Services, october: FakeClock,
        receiver: Callable[[list[int | str]], Receiver]) -> None:
    hook = receiver([503])
    tenant, headers, model = on_plan("five_x")
    put_alerts(client, headers, thresholds=[50], url=hook.url)
    classify(client, headers, model, 3)
    relay = AlertRelay(sessions=services.sessions, timeout_s=1, backoff_base_s=1, max_attempts=3, sealer=SEALER,
                       allow_private=True)
    results = []
    for _ in range(3):
        results += [o.result for o in relay.run_once().rows]
        october.advance(100)
    assert results == ["retry", "retry", "failed"]
    listed = client.get("/admin/events/deliveries", params={"status": "failed"}, headers=ADMIN).json()
    [row] = listed["data"]
    assert (row["tenant_id"], row["status"], row["attempts"], row["last_status"]) == (tenant["id"], "failed", 3, 503)
    assert client.get("/admin/events/deliveries", params={"status": "pending"}, headers=ADMIN).json()["data"] == []
    assert_envelope(client.get("/admin/events/deliveries", headers=headers), 403)
    metrics = client.get("/metrics", headers=ADMIN).text
    assert "modelmeter_alert_deliveries_failed 1.0" in metrics
    assert count(services, AlertEvent) == 1


def test_a_failed_delivery_is_retried_by_the_operator(
        client: TestClient, on_plan: Callable[..., Tenant], services: Services, october: FakeClock,
        receiver: Callable[[list[int | str]], Receiver]) -> None:
    """Before: a delivery the relay gave up on could never be sent again."""
    hook = receiver([503, 503, 200])
    _, headers, model = on_plan("five_x")
    secret = put_alerts(client, headers, thresholds=[50], url=hook.url).json()["secret"]
    classify(client, headers, model, 3)
    relay = AlertRelay(sessions=services.sessions, timeout_s=1, backoff_base_s=1, max_attempts=2, sealer=SEALER,
                       allow_private=True)
    for _ in range(2):
        relay.run_once()
        october.advance(100)
    [failed] = client.get("/admin/events/deliveries", params={"status": "failed"}, headers=ADMIN).json()["data"]
    assert_envelope(client.post("/admin/events/deliveries/999999/retry", headers=ADMIN), 404)
    assert_envelope(client.post(f"/admin/events/deliveries/{failed['id']}/retry", headers=headers), 403)
    retried = client.post(f"/admin/events/deliveries/{failed['id']}/retry", headers=ADMIN)
    assert retried.status_code == 200, retried.text
    assert (retried.json()["status"], retried.json()["attempts"], retried.json()["last_error"]) == ("pending", 0, None)
    assert_envelope(client.post(f"/admin/events/deliveries/{failed['id']}/retry", headers=ADMIN), 409,
                    code="delivery_not_failed")
    assert [o.result for o in relay.run_once().rows] == ["done"]
    sent_headers, body = hook.received[-1]
    verify(secret, sent_headers, body)


def test_alert_settings_can_be_deleted(client: TestClient, on_plan: Callable[..., Tenant], services: Services,
                                       receiver: Callable[[list[int | str]], Receiver]) -> None:
    """Before: alert settings could not be deleted; a tenant could only point them elsewhere."""
    hook = receiver([503])
    _, headers, model = on_plan("five_x")
    put_alerts(client, headers, thresholds=[50, 80], url=hook.url)
    classify(client, headers, model, 3)  # 60%: one event, one pending delivery
    deleted = client.delete("/v1/billing/alerts", headers=headers)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"object": "alert_settings", "thresholds": [], "url": None}
    assert client.get("/v1/billing/alerts", headers=headers).json()["url"] is None
    [delivery] = client.get("/admin/events/deliveries", headers=ADMIN).json()["data"]
    assert (delivery["status"], delivery["last_error"]) == ("failed", "alert settings deleted")
    assert_envelope(client.post(f"/admin/events/deliveries/{delivery['id']}/retry", headers=ADMIN), 409,
                    code="alerts_deleted")
    classify(client, headers, model, 2)  # 100%: no new event
    assert count(services, AlertEvent) == 1
    relay = AlertRelay(sessions=services.sessions, sealer=SEALER, allow_private=True)
    assert relay.run_once().rows == []
    assert hook.received == []
    assert client.delete("/v1/billing/alerts", headers=headers).status_code == 200  # idempotent


def test_signing_secrets_rest_sealed(client: TestClient, on_plan: Callable[..., Tenant],
                                     services: Services) -> None:
    """Before: the secret sat readable in the database (0644 on SQLite), enough to forge a tenant's webhooks."""
    tenant, headers, _ = on_plan("five_x")
    other, other_headers, _ = on_plan("five_x")
    secret = put_alerts(client, headers, thresholds=[50], url="https://example.com").json()["secret"]
    put_alerts(client, other_headers, thresholds=[50], url="https://example.com")
    with services.sessions() as session:
        row = session.get(AlertSetting, tenant["id"])
        other_row = session.get(AlertSetting, other["id"])
        assert row is not None
        assert other_row is not None
        stored, other_stored = row.secret, other_row.secret
    assert secret not in stored
    assert secret[6:] not in stored
    assert stored.startswith("sealed:v1:")
    assert SEALER.open_text(stored, tenant["id"]) == secret
    from cryptography.exceptions import InvalidTag

    with pytest.raises(InvalidTag):  # bound to its tenant: copied onto another's row, it does not open
        SEALER.open_text(stored, other["id"])
    with pytest.raises(InvalidTag):  # and only the admin token's key opens it
        secret_sealer("mmadmin_" + "z" * 40).open_text(other_stored, other["id"])


def test_dashboard_lists_recent_alerts(client: TestClient, on_plan: Callable[..., Tenant]) -> None:
    _, headers, model = on_plan("five_x")
    put_alerts(client, headers, thresholds=[50, 80], url="https://example.com")
    empty = client.get(client.post("/v1/dashboard/links", headers=headers).json()["url"].split("testserver")[-1])
    assert "No alerts yet" in empty.text
    classify(client, headers, model, 5)  # 100%
    link = client.post("/v1/dashboard/links", headers=headers).json()["url"]
    page = client.get(link.split("testserver")[-1])
    assert page.status_code == 200, page.text
    rows = page.text.split('<table id="alerts">')[1].split("</table>")[0]
    assert rows.count('<tr class="alert">') == 2
    assert rows.index("80% of included tokens") < rows.index("50% of included tokens")  # newest first


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "https://localhost/x", "http://169.254.169.254/latest",
                                 "http://10.1.2.3/", "http://[::1]:8080/", "http://0.0.0.0/", "http://api.localhost/"])
def test_private_urls_are_refused_by_default(client: TestClient, on_plan: Callable[..., Tenant], services: Services,
                                             url: str) -> None:
    """A tenant must not make the gateway POST into its own network (cloud metadata, loopback, private ranges)."""
    _, headers, _ = on_plan("five_x")
    with TestClient(create_app(services.settings.model_copy(update={"alerts_allow_private_urls": False})),
                    raise_server_exceptions=False) as strict:
        error = assert_envelope(strict.put("/v1/billing/alerts", json={"thresholds": [50], "url": url},
                                           headers=headers), 422, code="invalid_url")
    assert error["param"] == "url"
    assert count(services, AlertSetting) == 0


def test_a_name_resolving_to_a_private_address_is_caught_at_send_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A public-looking name is not resolved at PUT; the relay resolves it before each POST (the DNS answer is
    faked here: the name points at the cloud metadata address)."""
    import socket

    from modelmeter.billing.alerts import private_address

    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: [(2, 1, 6, "", ("169.254.169.254", 0))])
    assert private_address("https://hooks.example.net/x") is False
    assert private_address("https://hooks.example.net/x", resolve=True) is True
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: [(2, 1, 6, "", ("93.184.216.34", 0))])
    assert private_address("https://hooks.example.net/x", resolve=True) is False


def test_training_usage_fires_alerts_too(client: TestClient, on_plan: Callable[..., Tenant],
                                         services: Services) -> None:
    """The worker records a fine-tune's training tokens with the same alert hook: a tenant who only trains hears
    of its budget too."""
    from types import SimpleNamespace

    from modelmeter.billing.alerts import Alerts
    from modelmeter.trainer import meter_training

    tenant, headers, _ = on_plan("train_cent", monthly_budget_cents=100)
    put_alerts(client, headers, thresholds=[50, 100], url="https://example.com")
    job = SimpleNamespace(id="ftjob_t", tenant_id=tenant["id"], model="all-MiniLM-L6-v2")
    result = SimpleNamespace(training_tokens=60, wall_s=1.5)
    with services.sessions() as session:
        meter_training(session, job, result, "cpu", alerts=Alerts(services.plans))  # type: ignore[arg-type]
        session.commit()
    assert crossings(client, headers) == [("2026-10", "budget", 50, 60, 100)]


def test_secrets_stored_before_sealing_are_sealed_at_start(client: TestClient, on_plan: Callable[..., Tenant],
                                                           services: Services, settings: Settings) -> None:
    tenant, headers, _ = on_plan("five_x")
    put_alerts(client, headers, thresholds=[50], url="https://example.com")
    with services.sessions() as session:  # as round 2 stored it
        row = session.get(AlertSetting, tenant["id"])
        assert row is not None
        row.secret = "whsec_plain0123456789"
        session.add(row)
        session.commit()
    with TestClient(create_app(settings)):
        pass
    with services.sessions() as session:
        stored = session.get(AlertSetting, tenant["id"]).secret  # type: ignore[union-attr]
    assert stored.startswith("sealed:v1:")
    assert SEALER.open_text(stored, tenant["id"]) == "whsec_plain0123456789"
