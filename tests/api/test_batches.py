"""Batches: a batch file's lines served in the background through the routes themselves, metered once per line,
resumable after a crash, cancellable, bounded by their completion window, stopped by the quota."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from modelmeter.billing.meter import ledger_totals, quota_caps
from modelmeter.billing.periods import period_of
from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.batch_runner import BatchRunner
from modelmeter.gateway.services import services_of
from modelmeter.models.batches import Batch, line_request_id
from modelmeter.settings import Settings
from tests.conftest import ADMIN, assert_envelope, bearer
from tests.support.invoices import assert_upcoming_recomputes


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No runner in the background: each test drives one (``_run``) on the app's event loop."""
    return settings.model_copy(update={"batch_interval_s": 0})


@pytest.fixture
def tenant(make_tenant: Any, make_key: Any) -> tuple[str, dict[str, str]]:
    t = make_tenant()
    return t["id"], bearer(make_key(t["id"])["key"])


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _lines(model: str, n: int, url: str = "/v1/classify") -> list[dict[str, Any]]:
    return [{"custom_id": f"row-{i}", "method": "POST", "url": url,
             "body": {"model": model, "input": f"support ticket number {i}, please help"}} for i in range(n)]


def _batch(client: TestClient, headers: dict[str, str], lines: list[dict[str, Any]],
           endpoint: str = "/v1/classify") -> dict[str, Any]:
    uploaded = client.post("/v1/files", files={"file": ("b.jsonl", _jsonl(lines))}, data={"purpose": "batch"},
                           headers=headers)
    assert uploaded.status_code == 200, uploaded.text
    created = client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": endpoint,
                                               "completion_window": "24h", "metadata": {"job": "nightly"}},
                          headers=headers)
    assert created.status_code == 200, created.text
    return dict(created.json())


def _run(client: TestClient, **options: Any) -> BatchRunner:
    runner = BatchRunner(client.app, services_of(client.app), **options)
    client.portal.call(runner.run_once)  # type: ignore[union-attr]  # the app's own event loop
    return runner


def _content(client: TestClient, headers: dict[str, str], file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    response = client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert response.status_code == 200
    return [json.loads(line) for line in response.content.splitlines()]


def _usage_rows(client: TestClient, batch_id: str) -> list[str]:
    with services_of(client.app).sessions() as session:
        rows = session.exec(select(UsageEvent.request_id).where(UsageEvent.request_id.startswith("breq_"))).all()
    return sorted(rows)


def _batch_dir(client: TestClient, tenant_id: str, batch_id: str) -> Path:
    return services_of(client.app).settings.data_dir / "batches" / tenant_id / batch_id


def test_every_line_is_answered_as_the_route_answers_it_and_billed_once(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    lines = _lines(model, 5)
    lines[3]["body"]["model"] = "no-such-model"  # the route answers 404: the error file has it
    created = _batch(client, headers, lines)
    assert (created["status"], created["request_counts"], created["metadata"]) == (
        "in_progress", {"total": 5, "completed": 0, "failed": 0}, {"job": "nightly"})
    _run(client, chunk=2)
    done = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert (done["status"], done["request_counts"]) == ("completed", {"total": 5, "completed": 4, "failed": 1})
    assert done["completed_at"] is not None
    output = _content(client, headers, done["output_file_id"])
    errors = _content(client, headers, done["error_file_id"])
    assert sorted(o["custom_id"] for o in output) == ["row-0", "row-1", "row-2", "row-4"]
    for answer in output:
        line = next(x for x in lines if x["custom_id"] == answer["custom_id"])
        interactive = client.post("/v1/classify", json=line["body"], headers=headers).json()
        assert answer["response"]["status_code"] == 200
        assert answer["response"]["body"] == interactive  # byte for byte what the route answers
        assert answer["response"]["request_id"] == line_request_id(created["id"], answer["custom_id"])
        assert answer["error"] is None
    [refused] = errors
    assert (refused["custom_id"], refused["response"]["status_code"], refused["error"]["code"]) == (
        "row-3", 404, "model_not_found")
    billed = _usage_rows(client, created["id"])
    assert billed == sorted(line_request_id(created["id"], f"row-{i}") for i in (0, 1, 2, 4))


def test_a_runner_killed_mid_batch_is_resumed_without_serving_or_billing_a_line_twice(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    created = _batch(client, headers, _lines(model, 7))
    first = BatchRunner(client.app, services_of(client.app), chunk=3)
    first._progress = lambda *args: False  # type: ignore[method-assign]  # dies after its first chunk
    client.portal.call(first.run_once)  # type: ignore[union-attr]
    directory = _batch_dir(client, tenant_id, created["id"])
    output = directory / "output.jsonl"
    written = output.read_bytes().splitlines(keepends=True)
    assert len(written) == 3
    # The crash: the third answer was billed but its line never reached the disk, and a fourth was half written.
    output.write_bytes(b"".join(written[:2]) + b'{"id": "batch_req_torn", "custom')
    with services_of(client.app).sessions() as session:
        batch = session.get(Batch, created["id"])
        assert batch is not None
        assert batch.status == "in_progress"
        batch.lease_until = 0  # the dead runner's lease lapses
        session.add(batch)
        session.commit()
    _run(client, chunk=3)
    done = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert (done["status"], done["request_counts"]["completed"]) == ("completed", 7)
    answers = _content(client, headers, done["output_file_id"])
    assert sorted(a["custom_id"] for a in answers) == sorted(f"row-{i}" for i in range(7))  # each once
    assert _usage_rows(client, created["id"]) == sorted(line_request_id(created["id"], f"row-{i}") for i in range(7))


def test_cancel_stops_new_lines_and_keeps_what_was_served(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    created = _batch(client, headers, _lines(model, 3))
    cancelled = client.post(f"/v1/batches/{created['id']}/cancel", headers=headers).json()
    assert (cancelled["status"], cancelled["cancelling_at"] is not None) == ("cancelling", True)
    _run(client)
    done = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert (done["status"], done["request_counts"]["completed"], done["output_file_id"]) == ("cancelled", 0, None)
    assert _usage_rows(client, created["id"]) == []
    assert_envelope(client.post(f"/v1/batches/{created['id']}/cancel", headers=headers), 409,
                    code="batch_not_cancellable")


def test_a_batch_past_its_window_expires_keeping_what_was_served(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    created = _batch(client, headers, _lines(model, 2))
    with services_of(client.app).sessions() as session:
        batch = session.get(Batch, created["id"])
        assert batch is not None
        batch.expires_at = batch.created_at  # its 24 h are over
        session.add(batch)
        session.commit()
    _run(client)
    done = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert (done["status"], done["expired_at"] is not None, done["request_counts"]["completed"]) == (
        "expired", True, 0)


def test_a_line_refused_for_quota_stops_the_batch_having_billed_exactly_the_lines_served(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    assert client.patch(f"/admin/tenants/{tenant_id}", json={"monthly_budget_cents": 0}, headers=ADMIN).is_success
    created = _batch(client, headers, _lines(model, 4))
    _run(client, chunk=2)
    done = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert done["status"] == "failed"
    assert done["errors"]["data"][0]["code"] == "insufficient_quota"
    assert done["errors"]["data"][0]["line"] == 1
    errors = _content(client, headers, done["error_file_id"])
    assert {e["error"]["code"] for e in errors} == {"insufficient_quota"}
    assert len(errors) == 2  # the first chunk was in flight; nothing after it was served
    assert _usage_rows(client, created["id"]) == []


def test_batches_are_the_tenants_own_and_take_only_batch_files_of_their_endpoint(
        client: TestClient, tenant: tuple[str, dict[str, str]], make_tenant: Any, make_key: Any,
        register_model: Any) -> None:
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    created = _batch(client, headers, _lines(model, 1))
    other = make_tenant()
    other_headers = bearer(make_key(other["id"])["key"])
    assert_envelope(client.get(f"/v1/batches/{created['id']}", headers=other_headers), 404, code="batch_not_found")
    assert_envelope(client.post(f"/v1/batches/{created['id']}/cancel", headers=other_headers), 404)
    assert client.get("/v1/batches", headers=other_headers).json()["data"] == []
    body = {"input_file_id": created["input_file_id"], "endpoint": "/v1/classify", "completion_window": "24h"}
    assert_envelope(client.post("/v1/batches", json=body, headers=other_headers), 404, code="file_not_found")
    mismatched = assert_envelope(client.post("/v1/batches", json=body | {"endpoint": "/v1/embeddings"},
                                             headers=headers), 422, code="invalid_input_file")
    assert mismatched["param"] == "endpoint"
    training = client.post("/v1/files", files={"file": ("t.jsonl", b'{"text": "a", "label": "x"}\n'
                                                                    b'{"text": "b", "label": "y"}\n')},
                           data={"purpose": "fine-tune"}, headers=headers).json()
    assert_envelope(client.post("/v1/batches", json=body | {"input_file_id": training["id"]}, headers=headers),
                    422, code="invalid_input_file")
    assert_envelope(client.post("/v1/batches", json=body | {"completion_window": "1h"}, headers=headers), 422)
    assert [b["id"] for b in client.get("/v1/batches", headers=headers).json()["data"]] == [created["id"]]


def test_a_big_batch_hands_its_runner_back_so_a_later_small_one_is_not_kept_waiting(
        client: TestClient, make_tenant: Any, make_key: Any, register_model: Any) -> None:
    big_tenant, small_tenant = make_tenant(), make_tenant()
    big_headers, small_headers = (bearer(make_key(t["id"])["key"]) for t in (big_tenant, small_tenant))
    big = _batch(client, big_headers, _lines(register_model(big_tenant["id"]), 6))
    small = _batch(client, small_headers, _lines(register_model(small_tenant["id"]), 2))
    runner = BatchRunner(client.app, services_of(client.app), chunk=2, share=2)

    def status(headers: dict[str, str], batch: dict[str, Any]) -> tuple[str, int]:
        body = client.get(f"/v1/batches/{batch['id']}", headers=headers).json()
        return body["status"], body["request_counts"]["completed"]

    client.portal.call(runner.run_once)  # type: ignore[union-attr]  # the older batch first: one share of it
    assert (status(big_headers, big), status(small_headers, small)) == (("in_progress", 2), ("in_progress", 0))
    client.portal.call(runner.run_once)  # type: ignore[union-attr]  # then the one never served
    assert (status(big_headers, big), status(small_headers, small)) == (("in_progress", 2), ("completed", 2))
    for _ in range(2):
        client.portal.call(runner.run_once)  # type: ignore[union-attr]
    assert status(big_headers, big) == ("completed", 6)
    assert client.portal.call(runner.run_once) is False  # type: ignore[union-attr]  # nothing left to claim


def test_the_operator_lists_shows_and_follows_batches(client: TestClient, tenant: tuple[str, dict[str, str]],
                                                      register_model: Any, settings: Settings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from modelmeter.cli import main
    from tests.conftest import ADMIN_TOKEN

    tenant_id, headers = tenant
    model = register_model(tenant_id)
    lines = _lines(model, 3)
    lines[1]["body"]["model"] = "no-such-model"
    created = _batch(client, headers, lines)
    pending = _batch(client, headers, _lines(model, 1))
    client.post(f"/v1/batches/{pending['id']}/cancel", headers=headers)
    _run(client)
    _run(client)
    for name, value in (("MODELMETER_DATA_DIR", str(settings.data_dir)), ("MODELMETER_DATABASE_URL",
                        settings.database_url), ("MODELMETER_ADMIN_TOKEN", ADMIN_TOKEN)):
        monkeypatch.setenv(name, value)
    cli = CliRunner()
    listed = cli.invoke(main, ["batches", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [b["id"] for b in json.loads(listed.output)["data"]] == [pending["id"], created["id"]]
    shown = cli.invoke(main, ["batches", "show", created["id"]])
    assert shown.exit_code == 0, shown.output
    assert "completed" in shown.output
    assert "3/3" in shown.output  # lines done (answered or refused) of all
    assert "failed=1" in shown.output
    followed = cli.invoke(main, ["batches", "show", created["id"], "--follow", "--json"])
    assert followed.exit_code == 0  # finished: the bar closes at once, completed exits 0
    assert json.loads(followed.output)["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    cancelled = cli.invoke(main, ["batches", "show", pending["id"], "--follow"])
    assert cancelled.exit_code == 1  # followed to its end, which is not "completed"
    assert cli.invoke(main, ["batches", "show", "batch_nosuch"]).exit_code != 0


def test_a_line_the_platform_could_not_serve_is_retried_not_written_off(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    tenant_id, headers = tenant
    created = _batch(client, headers, _lines(register_model(tenant_id), 4))
    runner = BatchRunner(client.app, services_of(client.app), chunk=4)
    serve = runner._serve
    failed_once: set[str] = set()

    async def engine_down_once(*args: Any) -> tuple[bool, dict[str, Any]]:
        ok, answer = await serve(*args)
        if answer["custom_id"] == "row-2" and "row-2" not in failed_once:  # the engine was restarting
            failed_once.add("row-2")
            answer["response"]["status_code"] = 503
            answer["error"] = {"code": "engine_unavailable", "message": "retry"}
            return False, answer
        return ok, answer

    runner._serve = engine_down_once  # type: ignore[method-assign]
    client.portal.call(runner.run_once)  # type: ignore[union-attr]
    first = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert (first["status"], first["request_counts"]["completed"], first["request_counts"]["failed"]) == (
        "in_progress", 3, 0)  # row-2 is neither an answer nor an error: the batch was handed back
    client.portal.call(runner.run_once)  # type: ignore[union-attr]
    done = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert (done["status"], done["request_counts"]) == ("completed", {"total": 4, "completed": 4, "failed": 0})
    assert sorted(a["custom_id"] for a in _content(client, headers, done["output_file_id"])) == [
        "row-0", "row-1", "row-2", "row-3"]


def test_a_running_batchs_input_cannot_be_deleted_and_a_lost_one_fails_the_batch(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    tenant_id, headers = tenant
    created = _batch(client, headers, _lines(register_model(tenant_id), 2))
    assert_envelope(client.delete(f"/v1/files/{created['input_file_id']}", headers=headers), 409,
                    code="file_in_use")
    data_dir = services_of(client.app).settings.data_dir
    for path in (data_dir / "files" / tenant_id).iterdir():  # lost from the volume behind the platform's back
        path.unlink()
    _run(client)
    done = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert (done["status"], done["errors"]["data"][0]["code"]) == ("failed", "input_file_missing")
    assert client.delete(f"/v1/files/{created['input_file_id']}", headers=headers).status_code == 200


def test_a_stopping_front_hands_its_batch_back(client: TestClient, tenant: tuple[str, dict[str, str]],
                                               register_model: Any) -> None:
    tenant_id, headers = tenant
    created = _batch(client, headers, _lines(register_model(tenant_id), 3))
    runner = BatchRunner(client.app, services_of(client.app))
    runner._loop._stop.set()  # SIGTERM: the front's loops are stopping
    assert client.portal.call(runner.run_once) is True  # type: ignore[union-attr]
    with services_of(client.app).sessions() as session:
        batch = session.get(Batch, created["id"])
        assert batch is not None
        assert (batch.status, batch.completed, batch.lease_owner) == ("in_progress", 0, None)  # free for another
    _run(client)
    assert client.get(f"/v1/batches/{created['id']}", headers=headers).json()["status"] == "completed"


def test_batch_lines_are_invoiced_apart_at_the_plans_discount(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    """A payg tenant's batch lines land on ``(batch)`` invoice lines at 50% of the prices, its interactive
    requests on the usual ones; a client recomputes each to the cent from /admin/plans and /v1/usage."""
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    created = _batch(client, headers, _lines(model, 6))
    _run(client, chunk=4)
    assert client.get(f"/v1/batches/{created['id']}", headers=headers).json()["status"] == "completed"
    for i in range(3):
        assert client.post("/v1/classify", json={"model": model, "input": f"interactive {i}"},
                           headers=headers).status_code == 200
    with services_of(client.app).sessions() as session:
        kinds = session.exec(select(UsageEvent.kind).where(UsageEvent.tenant_id == tenant_id)).all()
    assert sorted(kinds) == ["batch"] * 6 + ["inference"] * 3
    start = int(time.time()) - 40 * 86400  # the period's first day is within the last 40
    billed = assert_upcoming_recomputes(client.get, headers, ADMIN, "payg", start, int(time.time()) + 1)
    assert set(billed) == {"requests", "tokens", "batch_requests", "batch_tokens"}
    lines = {x["code"]: x for x in client.get("/v1/billing/invoices/upcoming", headers=headers).json()["lines"]["data"]}
    assert lines["batch_requests"]["description"] == "Requests (batch): 6 used, 50% batch discount"
    assert lines["batch_requests"]["unit_amount_decimal"] == "0.025"  # half of payg's 0.05 cents a request
    usage = client.get("/v1/usage", headers=headers, params={"start_time": start, "bucket_width": "1d"}).json()
    assert sum(r["batch_requests"] for b in usage["data"] for r in b["results"]) == 6


def test_a_budget_holds_batch_lines_at_their_discounted_price(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    """A budget that full-price lines would pass half-way through serves the whole batch at half price: the
    reservation prices a batch line at the discount, atomically with the budget check, as the invoice does."""
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    lines = _lines(model, 20)
    probe = client.post("/v1/classify", json=lines[0]["body"], headers=headers).json()["usage"]["total_tokens"]
    # payg: 0.05 cents a request and 0.002 cents a token; the probe itself costs one full-price request.
    full_micro = 50_000 + 2_000 * probe
    budget_cents = -(-(full_micro * 11) // 10**6)  # the probe and ten more at full price; twenty at half
    assert 10 * full_micro < budget_cents * 10**6 - full_micro < 20 * full_micro
    assert client.patch(f"/admin/tenants/{tenant_id}", json={"monthly_budget_cents": budget_cents},
                        headers=ADMIN).is_success
    created = _batch(client, headers, lines)
    _run(client, chunk=5)
    done = client.get(f"/v1/batches/{created['id']}", headers=headers).json()
    assert (done["status"], done["request_counts"]["completed"]) == ("completed", 20), done


def test_counters_rebuilt_from_the_ledger_keep_the_batch_part(
        client: TestClient, tenant: tuple[str, dict[str, str]], register_model: Any) -> None:
    """The quota's baseline (read from the ledger when counters start: a restart, an evicted Redis key) keeps
    the batch part, so the budget goes on pricing those lines at the discount."""
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    _batch(client, headers, _lines(model, 5))
    _run(client)
    services = services_of(client.app)
    baseline = ledger_totals(sessions=services.sessions, tenant_id=tenant_id, period=period_of(int(time.time())))
    assert (baseline.requests, baseline.batch_requests) == (5, 5)
    assert baseline.tokens == baseline.batch_tokens > 0
    payg = services.plans.get("payg")
    caps = quota_caps(payg, budget_cents=10**6)
    assert caps is not None
    # 5 requests at half of 0.05 c and the tokens at half of 0.002 c: half what they would cost interactive.
    assert 2 * caps.cost_of(baseline) == caps.cost_of(replace(baseline, batch_requests=0, batch_tokens=0))


def test_a_slow_chunk_keeps_its_lease(client: TestClient, tenant: tuple[str, dict[str, str]],
                                      register_model: Any) -> None:
    """Batch rows wait behind interactive ones, so a chunk can outlast the lease: it is renewed while the chunk is
    served, so no other front claims the batch and serves the same lines."""
    tenant_id, headers = tenant
    model = register_model(tenant_id)
    created = _batch(client, headers, _lines(model, 2))
    runner = BatchRunner(client.app, services_of(client.app), lease_s=3)
    serve, seen = runner._serve, []

    async def slow(*args: Any) -> Any:
        await asyncio.sleep(2.5)  # most of the lease
        with services_of(client.app).sessions() as session:
            seen.append(session.get(Batch, created["id"]).lease_until - int(time.time()))  # type: ignore[union-attr]
        return await serve(*args)

    runner._serve = slow  # type: ignore[method-assign]
    client.portal.call(runner.run_once)  # type: ignore[union-attr]
    assert min(seen) >= 2  # renewed meanwhile: a lease taken 2.5 s ago for 3 s would have a second left at most
    assert client.get(f"/v1/batches/{created['id']}", headers=headers).json()["status"] == "completed"
