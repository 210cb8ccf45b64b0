"""Batch events: a batch that ends ``completed`` or ``failed`` has one event (``batch.completed``, ``batch.failed``),
written with its final status, listed by ``GET /v1/events`` beside the usage alerts, never written twice, and
POSTed, signed, to the tenant's alert URL by the same relay; the webhooks are documented with the same model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, select

from modelmeter import clock
from modelmeter.billing import alerts, batch_events
from modelmeter.billing.alert_relay import AlertRelay
from modelmeter.billing.tables import AlertDelivery, AlertEvent
from modelmeter.gateway import batch_runner
from modelmeter.gateway.services import Services
from modelmeter.ids import new_id
from modelmeter.models.batches import Batch
from modelmeter.settings import Settings
from tests.api.test_batches import _batch, _batch_dir, _lines, _run
from tests.conftest import ADMIN, ADMIN_TOKEN, bearer
from tests.support.alerts import Receiver, verify


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No runner nor relay in the background (each test drives them); the receivers listen on 127.0.0.1."""
    return settings.model_copy(update={"batch_interval_s": 0, "alerts_relay_interval_s": 0,
                                       "alerts_allow_private_urls": True})


@pytest.fixture
def tenant(make_tenant: Any, make_key: Any) -> tuple[str, dict[str, str]]:
    t = make_tenant()
    return t["id"], bearer(make_key(t["id"])["key"])


def _events(client: TestClient, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    response = client.get("/v1/events", headers=headers, params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _batch_events(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    return [e for e in _events(client, headers)["data"] if e["type"].startswith("batch.")]


def _get(client: TestClient, headers: dict[str, str], batch_id: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/batches/{batch_id}", headers=headers).json())


def _expected(batch: dict[str, Any]) -> dict[str, Any]:
    """An event's ``data`` for ``batch`` (``GET /v1/batches/{id}``'s answer)."""
    return {"id": batch["id"], "status": batch["status"], "request_counts": batch["request_counts"],
            "output_file_id": batch["output_file_id"], "error_file_id": batch["error_file_id"]}


def _assert_conforms(client: TestClient, component: str, instance: Any) -> None:
    """``instance`` is valid under the OpenAPI document's ``component`` (what schemathesis checks responses by;
    its own runs see no batch event, the tenants it makes run no batch)."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # schemathesis's validator
    document = client.get("/openapi.json").json()
    schema = {"$ref": f"#/components/schemas/{component}", "components": document["components"]}
    jsonschema_rs.Draft202012Validator(schema).validate(instance)


def _rows(services: Services, table: Any) -> list[Any]:
    with services.sessions() as session:
        return list(session.exec(select(table)).all())


def test_a_completed_batch_has_one_batch_completed_event(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any, services: Services,
        make_tenant: Any, make_key: Any) -> None:
    tenant_id, headers = tenant
    lines = _lines(register_model(tenant_id), 3)
    lines[1]["body"]["model"] = "no-such-model"  # one line in the error file: both files in the event
    created = _batch(client, headers, lines)
    assert _batch_events(client, headers) == []  # nothing until it ends
    before = clock.now_s()
    _run(client, chunk=2)
    done = _get(client, headers, created["id"])
    assert (done["status"], done["request_counts"]) == ("completed", {"total": 3, "completed": 2, "failed": 1})
    [event] = _events(client, headers)["data"]
    assert set(event) == {"id", "object", "type", "created", "data"}
    assert (event["object"], event["type"], event["id"].startswith("evt_")) == ("event", "batch.completed", True)
    assert before <= event["created"] <= clock.now_s()
    assert event["data"] == _expected(done)
    assert done["output_file_id"] is not None
    assert done["error_file_id"] is not None
    assert _rows(services, AlertDelivery) == []  # no alert settings: listed, not sent
    other = bearer(make_key(make_tenant()["id"])["key"])
    assert _events(client, other)["data"] == []  # the tenant's own


def test_a_batch_refused_for_quota_has_one_batch_failed_event(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    assert client.patch(f"/admin/tenants/{tenant_id}", json={"monthly_budget_cents": 0}, headers=ADMIN).is_success
    created = _batch(client, headers, _lines(model, 4))
    _run(client, chunk=2)
    done = _get(client, headers, created["id"])
    assert (done["status"], done["errors"]["data"][0]["code"]) == ("failed", "insufficient_quota")
    [event] = _batch_events(client, headers)
    assert event["type"] == "batch.failed"
    assert event["data"] == _expected(done)
    assert event["data"]["request_counts"] == {"total": 4, "completed": 0, "failed": 2}
    assert (event["data"]["output_file_id"], event["data"]["error_file_id"] is not None) == (None, True)


def test_a_batch_whose_input_is_lost_has_one_batch_failed_event(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any, services: Services) -> None:
    tenant_id, headers = tenant
    created = _batch(client, headers, _lines(register_model(tenant_id), 2))
    for path in (services.settings.data_dir / "files" / tenant_id).iterdir():
        path.unlink()
    _run(client)
    done = _get(client, headers, created["id"])
    assert (done["status"], done["errors"]["data"][0]["code"]) == ("failed", "input_file_missing")
    [event] = _batch_events(client, headers)
    assert (event["type"], event["data"]) == ("batch.failed", {
        "id": created["id"], "status": "failed", "request_counts": {"total": 2, "completed": 0, "failed": 0},
        "output_file_id": None, "error_file_id": None})


def test_cancelled_and_expired_batches_have_no_event(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any, services: Services) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    cancelled = _batch(client, headers, _lines(model, 1))
    client.post(f"/v1/batches/{cancelled['id']}/cancel", headers=headers)
    expired = _batch(client, headers, _lines(model, 1))
    with services.sessions() as session:
        row = session.get(Batch, expired["id"])
        assert row is not None
        row.expires_at = row.created_at
        session.add(row)
        session.commit()
    _run(client)
    _run(client)
    assert {_get(client, headers, b["id"])["status"] for b in (cancelled, expired)} == {"cancelled", "expired"}
    assert _events(client, headers)["data"] == []


def test_ending_a_batch_again_writes_no_second_event_or_delivery(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any, services: Services,
        receiver: Callable[[list[int | str]], Receiver]) -> None:
    tenant_id, headers = tenant
    assert client.put("/v1/billing/alerts", json={"thresholds": [1000], "url": receiver([200]).url},
                      headers=headers).status_code == 200
    created = _batch(client, headers, _lines(register_model(tenant_id), 2))
    runner = _run(client)
    [event] = _batch_events(client, headers)
    directory = _batch_dir(client, tenant_id, created["id"])
    runner._finish(created["id"], "completed", directory / "output.jsonl", directory / "errors.jsonl", None)
    assert client.portal.call(runner.run_once) is False  # type: ignore[union-attr]  # nothing left to claim
    # A runner that believes it still holds the batch (a replica whose view is stale) ends it again, twice.
    for _ in range(2):
        with services.sessions() as session:
            row = session.get(Batch, created["id"])
            assert row is not None
            row.lease_owner, row.status = runner.owner, "in_progress"
            session.add(row)
            session.commit()
        runner._finish(created["id"], "completed", directory / "output.jsonl", directory / "errors.jsonl", None)
        assert _get(client, headers, created["id"])["status"] == "completed"
    assert _batch_events(client, headers) == [event]
    [delivery] = _rows(services, AlertDelivery)
    assert (delivery.event_id, delivery.status) == (event["id"], "pending")
    # The billing layer's own guarantee, called as the runner calls it.
    with services.sessions() as session:
        again = batch_events.batch_ended(session.connection(), tenant_id=tenant_id, batch_id=created["id"],
                                   status="completed", total=2, completed=2, failed=0, output_file_id=None,
                                   error_file_id=None)
        session.commit()
    assert again is None
    assert [e.id for e in _rows(services, AlertEvent)] == [event["id"]]
    assert len(_rows(services, AlertDelivery)) == 1


def test_the_event_is_written_with_the_final_status_or_not_at_all(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any, services: Services,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tenant_id, headers = tenant
    created = _batch(client, headers, _lines(register_model(tenant_id), 2))
    real = batch_events.batch_ended

    def written_then_crash(*args: Any, **kwargs: Any) -> str | None:
        real(*args, **kwargs)
        raise RuntimeError("the process died before the commit")

    monkeypatch.setattr(batch_runner.batch_events, "batch_ended", written_then_crash)
    _run(client)  # the runner logs the failure; its lease lapses
    assert _get(client, headers, created["id"])["status"] == "in_progress"
    assert _rows(services, AlertEvent) == []  # rolled back with the status
    monkeypatch.setattr(batch_runner.batch_events, "batch_ended", real)
    with services.sessions() as session:
        row = session.get(Batch, created["id"])
        assert row is not None
        row.lease_until = 0
        session.add(row)
        session.commit()
    _run(client)
    done = _get(client, headers, created["id"])
    assert done["status"] == "completed"
    assert [e["data"] for e in _batch_events(client, headers)] == [_expected(done)]


def test_batch_events_are_listed_and_paged_with_usage_alerts(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any, services: Services) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    usage_id = f"{new_id('evt')}00"
    with services.sessions() as session:  # a threshold crossed before the batches ran
        session.add(AlertEvent(id=usage_id, tenant_id=tenant_id, period="2026-12", resource="budget",
                               threshold_percent=50, value=5, limit_value=10, created=clock.now_s()))
        session.commit()
    first, second = _batch(client, headers, _lines(model, 1)), _batch(client, headers, _lines(model, 1))
    _run(client)
    _run(client)
    seen, after = [], None
    while True:
        page = _events(client, headers, limit=1, **({"after": after} if after else {}))
        seen += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [(e["type"], e["data"].get("id")) for e in seen] == [
        ("batch.completed", second["id"]), ("batch.completed", first["id"]), ("usage.threshold_crossed", None)]
    assert seen[2]["data"] == {"period": "2026-12", "resource": "budget", "threshold_percent": 50, "value": 5,
                               "limit": 10}
    _assert_conforms(client, "Page_Event_", _events(client, headers))
    # The dashboard's alerts panel lists usage alerts only.
    link = client.post("/v1/dashboard/links", headers=headers).json()["url"]
    page_html = client.get(link.split("testserver")[-1])
    assert page_html.status_code == 200, page_html.text
    assert page_html.text.split('<table id="alerts">')[1].split("</table>")[0].count('<tr class="alert">') == 1


def test_the_relay_delivers_the_batch_event_signed(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any, services: Services,
        receiver: Callable[[list[int | str]], Receiver]) -> None:
    tenant_id, headers = tenant
    hook = receiver([503, 200])
    put = client.put("/v1/billing/alerts", json={"thresholds": [1000], "url": hook.url}, headers=headers)
    assert put.status_code == 200, put.text
    model = register_model(tenant_id)
    lost = _batch(client, headers, _lines(model, 1))
    for path in (services.settings.data_dir / "files" / tenant_id).iterdir():  # its input file, lost
        path.unlink()
    _run(client)
    completed = _batch(client, headers, _lines(model, 1))
    _run(client)
    events = {e["type"]: e for e in _batch_events(client, headers)}
    assert {t: e["data"]["id"] for t, e in events.items()} == {"batch.failed": lost["id"],
                                                               "batch.completed": completed["id"]}
    relay = AlertRelay(sessions=services.sessions, timeout_s=2, backoff_base_s=0, sealer=alerts.secret_sealer(
        ADMIN_TOKEN), allow_private=True)
    # One delivery per tenant per round, the oldest first; no backoff here, so the 503 is retried at once.
    results = [[o.result for o in relay.run_once().rows] for _ in range(4)]
    assert results == [["retry"], ["done"], ["done"], []]  # each event delivered once
    bodies = [json.loads(body) for _, body in hook.received]
    assert bodies == [events["batch.failed"], events["batch.failed"], events["batch.completed"]]
    for sent_headers, body in hook.received:
        verify(put.json()["secret"], sent_headers, body)
        _assert_conforms(client, "Event", json.loads(body))
        assert sent_headers["content-type"] == "application/json"
    with services.sessions() as session:
        rows = session.exec(select(AlertDelivery).order_by(col(AlertDelivery.id))).all()
    assert [(d.event_id, d.status) for d in rows] == [(events["batch.failed"]["id"], "done"),
                                                      (events["batch.completed"]["id"], "done")]


def test_the_batch_webhooks_are_documented_with_the_events_model(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    for name in ("usage.threshold_crossed", "batch.completed", "batch.failed"):
        hook = document["webhooks"][name]["post"]
        assert hook["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Event"
        assert set(hook["responses"]) == {"2XX"}
    schemas = document["components"]["schemas"]
    event = schemas["Event"]
    assert event["properties"]["type"]["enum"] == ["usage.threshold_crossed", "batch.completed", "batch.failed"]
    assert event["properties"]["data"]["anyOf"] == [{"$ref": "#/components/schemas/EventData"},
                                                    {"$ref": "#/components/schemas/BatchEventData"}]
    batch = schemas["BatchEventData"]
    assert set(batch["required"]) == {"id", "status", "request_counts", "output_file_id", "error_file_id"}
    assert batch["additionalProperties"] is False
    assert schemas["EventData"]["additionalProperties"] is False  # so a data matches one branch only
    assert set(schemas["EventData"]["required"]) == {"period", "resource", "threshold_percent", "value", "limit"}


def test_an_event_carries_the_data_of_its_type() -> None:
    from pydantic import ValidationError

    usage = {"period": "2026-12", "resource": "budget", "threshold_percent": 50, "value": 5, "limit": 10}
    batch = {"id": "batch_x", "status": "failed", "request_counts": {"total": 1, "completed": 0, "failed": 1},
             "output_file_id": None, "error_file_id": "file_y"}
    base = {"id": "evt_x", "object": "event", "created": 1}
    assert isinstance(alerts.EventPublic.model_validate({**base, "type": "batch.failed", "data": batch}).data,
                      batch_events.BatchEventData)
    assert isinstance(alerts.EventPublic.model_validate(
        {**base, "type": "usage.threshold_crossed", "data": usage}).data, alerts.EventData)
    for wrong in ({"type": "batch.failed", "data": usage}, {"type": "usage.threshold_crossed", "data": batch},
                  {"type": "batch.completed", "data": {**batch, "period": "2026-12"}}):
        with pytest.raises(ValidationError):
            alerts.EventPublic.model_validate({**base, **wrong})


def test_the_migration_keeps_events_and_deliveries_on_sqlite(tmp_path: Path) -> None:
    """0014 rebuilds ``alert_event`` on SQLite (its usage columns become nullable) while ``alert_delivery`` rows
    reference it, under ``PRAGMA foreign_keys=ON``: a plain batch rebuild fails there (DROP TABLE finds the
    references); the deliveries are set aside and put back. And back down, the batch events go with their
    deliveries."""
    from alembic import command
    from sqlalchemy import text

    from modelmeter import db

    engine = db.make_engine(f"sqlite:///{tmp_path}/old.db")
    db.upgrade(engine, "0013")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO alert_event VALUES ('evt_1', 'usage.threshold_crossed', 'ten_1', '2026-10', "
                          "'budget', 50, 5, 10, 1)"))
        conn.execute(text("INSERT INTO alert_delivery (id, event_id, tenant_id, url, status, attempts, "
                          "next_attempt_at, created) VALUES (7, 'evt_1', 'ten_1', 'https://x', 'done', 1, 1, 1)"))
    db.upgrade(engine, "0014")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT id, period, batch_id FROM alert_event")).all() == [("evt_1", "2026-10", None)]
        assert conn.execute(text("SELECT id, event_id, status FROM alert_delivery")).all() == [(7, "evt_1", "done")]
        conn.execute(text("INSERT INTO alert_event (id, type, tenant_id, created, batch_id) "
                          "VALUES ('evt_2', 'batch.completed', 'ten_1', 2, 'batch_1')"))
        conn.execute(text("INSERT INTO alert_delivery (id, event_id, tenant_id, url, status, attempts, "
                          "next_attempt_at, created) VALUES (8, 'evt_2', 'ten_1', 'https://x', 'pending', 0, 1, 1)"))
        assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
    command.downgrade(db._alembic_config(engine), "0013")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT id FROM alert_event")).all() == [("evt_1",)]
        assert conn.execute(text("SELECT id FROM alert_delivery")).all() == [(7,)]
    db.upgrade(engine, "0014")
    assert db.current_revision(engine) == "0014"
    engine.dispose()
