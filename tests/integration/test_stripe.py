"""Stripe, exactly once, against localstripe (a stateful Stripe emulator started on a loopback port).

Customers, subscriptions and invoices reach Stripe with our amounts; closing twice, re-sending, and crashing
between the Stripe call and the mark create nothing twice; an unreachable Stripe loses nothing; webhooks are
verified, applied once, and give the same state in any order.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import stripe
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlmodel import col, select

from modelmeter.billing.stripe.client import PermanentSyncError, StripeConfigError, make_client
from modelmeter.billing.stripe.mirror import Sent
from modelmeter.billing.stripe.relay import LEASE_S, StripeRelay, backoff_s, relay_from_settings
from modelmeter.billing.stripe.webhooks import HANDLED_EVENTS
from modelmeter.billing.tables import Invoice, StripeOutbox, StripePlan
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import services_of
from modelmeter.settings import Settings
from tests.conftest import ADMIN, ON_POSTGRES, FakeClock, assert_envelope
from tests.integration.conftest import (
    GRACE_S,
    billed_october,
    close,
    customers_of,
    db,
    deliver,
    event,
    events_recorded,
    invoice_of,
    live_subscriptions,
    new_tenant,
    our_lines,
    outbox,
    relay_of,
    sign,
    stripe_invoices_of,
    tenant_row,
    ts,
    use,
)
from tests.support.net import free_port

pytest.importorskip("localstripe")


# --- mapping ---------------------------------------------------------------------------------------------------


def test_tenant_becomes_a_customer_with_a_subscription(app: TestClient, api: stripe.StripeClient) -> None:
    tenant = new_tenant(app, "pro")
    rows = outbox(app, tenant["id"])
    assert [(r.kind, r.status, r.idempotency_key) for r in rows] == [
        ("customer", "pending", f"mm-customer-{tenant['id']}"),
        ("subscription", "pending", f"mm-subscription-{rows[1].object_id}"),
    ]
    report = relay_of(app).tick()
    assert [(r.kind, r.result) for r in report.rows] == [("customer", "done"), ("subscription", "done")]

    (customer,) = customers_of(api, tenant)
    assert (customer.email, customer.name) == (tenant["email"], tenant["name"])
    stored = app.get(f"/admin/tenants/{tenant['id']}", headers=ADMIN).json()
    assert stored["stripe_customer_id"] == customer.id
    (subscription,) = live_subscriptions(api, customer.id)
    assert subscription.id == tenant_row(app, tenant["id"]).stripe_subscription_id
    assert subscription["plan"]["id"] == "mm_pro_usd_monthly"
    assert subscription["plan"]["amount"] == 0
    with db(app) as session:
        assert session.get(StripePlan, "pro") is not None
    assert relay_of(app).tick().rows == []  # nothing left to send


def test_plan_change_moves_the_subscription(app: TestClient, api: stripe.StripeClient) -> None:
    tenant = new_tenant(app, "payg")
    relay_of(app).tick()
    first = tenant_row(app, tenant["id"]).stripe_subscription_id
    assert app.patch(f"/admin/tenants/{tenant['id']}", json={"plan": "pro"}, headers=ADMIN).status_code == 200
    assert [r.kind for r in outbox(app, tenant["id"]) if r.status == "pending"] == ["subscription"]
    relay_of(app).tick()
    row = tenant_row(app, tenant["id"])
    (live,) = live_subscriptions(api, str(row.stripe_customer_id))
    assert live.id == row.stripe_subscription_id != first
    assert live["plan"]["id"] == "mm_pro_usd_monthly"
    assert api.v1.subscriptions.retrieve(str(first)).status == "canceled"


def test_closed_invoice_reaches_stripe_with_our_amounts(app: TestClient, api: stripe.StripeClient,
                                                        october: FakeClock) -> None:
    tenant = billed_october(app, october)
    invoice, lines = invoice_of(app, tenant["id"])
    assert invoice.sync_status == "pending"
    assert len(lines) >= 2
    assert invoice.total > 0
    relay_of(app).tick()

    invoice, lines = invoice_of(app, tenant["id"])
    assert invoice.sync_status == "synced"
    assert invoice.stripe_invoice_id
    customer_id = str(tenant_row(app, tenant["id"]).stripe_customer_id)
    (remote,) = stripe_invoices_of(api, customer_id, invoice.id)
    assert remote.id == invoice.stripe_invoice_id
    assert remote.total == invoice.total
    remote_lines = our_lines(api, remote.id, invoice.id)
    assert sum(line.amount for line in remote_lines) == invoice.total
    assert sorted((int(x.metadata["mm_line"]), x.amount) for x in remote_lines) == [(x.position, x.amount)
                                                                                     for x in lines]
    assert {x.stripe_invoice_item_id for x in lines} == {x["invoice_item"] for x in remote_lines}
    public = app.get(f"/admin/tenants/{tenant['id']}", headers=ADMIN).json()
    assert public["stripe_customer_id"] == customer_id


def test_batch_lines_reach_stripe_as_items_of_their_own(app: TestClient, api: stripe.StripeClient,
                                                         october: FakeClock) -> None:
    """Batch API usage closes into ``batch_*`` lines at the plan's discount, and each is an invoice item in Stripe
    with our amount and its code."""
    october.t = ts(2026, 10, 1)
    tenant = new_tenant(app, "payg")
    use(app, tenant, ts(2026, 10, 12), tokens=10_000, requests_=2)
    use(app, tenant, ts(2026, 10, 13), tokens=10_000, requests_=4, kind="batch")
    october.t = ts(2026, 11, 2)
    close(app, "2026-10")
    relay_of(app).tick()
    invoice, lines = invoice_of(app, tenant["id"])
    assert invoice.sync_status == "synced"
    ours = {x.code: x.amount for x in lines}
    # payg: 0.05 c a request, 0.002 c a token; batch at 50%: 4 x 0.025 = 0.1 -> 0 c, 40,000 x 0.001 = 40 c.
    assert ours == {"requests": 0, "tokens": 40, "batch_requests": 0, "batch_tokens": 40}
    (remote,) = stripe_invoices_of(api, str(tenant_row(app, tenant["id"]).stripe_customer_id), invoice.id)
    remote_lines = our_lines(api, remote.id, invoice.id)
    assert {x.metadata["code"]: x.amount for x in remote_lines} == ours
    assert remote.total == invoice.total == 80


def test_closing_twice_and_sending_again_creates_no_duplicate(app: TestClient, api: stripe.StripeClient,
                                                              october: FakeClock) -> None:
    tenant = billed_october(app, october)
    assert close(app, "2026-10")["already_closed"] is True
    assert [r.kind for r in outbox(app, tenant["id"])] == ["customer", "subscription", "invoice"]
    relay_of(app).tick()
    with db(app) as session:  # as if the marks had been lost: every row must be sent again
        for row in session.exec(select(StripeOutbox).where(StripeOutbox.tenant_id == tenant["id"])).all():
            row.status = "pending"
            session.add(row)
        session.commit()
    assert [r.result for r in relay_of(app).tick().rows] == ["done", "done", "done"]

    invoice, lines = invoice_of(app, tenant["id"])
    (customer,) = customers_of(api, tenant)
    assert len(live_subscriptions(api, customer.id)) == 1
    (remote,) = stripe_invoices_of(api, customer.id, invoice.id)
    assert len(our_lines(api, remote.id, invoice.id)) == len(lines)


# --- crashes between the Stripe call and the mark ---------------------------------------------------------------


class Crash(BaseException):
    """The process dies (not an error the relay could handle)."""


def crash_on(monkeypatch: pytest.MonkeyPatch, relay: StripeRelay, kind: str) -> None:
    """Fault injected after the Stripe call, before the row is marked done."""
    complete = relay._complete

    def dying(row: StripeOutbox, sent: Sent) -> None:
        if row.kind == kind:
            raise Crash(kind)
        complete(row, sent)

    monkeypatch.setattr(relay, "_complete", dying)


def test_restart_after_a_crash_between_call_and_mark_creates_no_duplicate(
        app: TestClient, api: stripe.StripeClient, october: FakeClock, monkeypatch: pytest.MonkeyPatch,
        restart: Callable[[], StripeRelay]) -> None:
    tenant = billed_october(app, october)
    october.t = ts(2026, 11, 2)
    for kind in ("customer", "subscription", "invoice"):
        relay = restart()
        crash_on(monkeypatch, relay, kind)
        with pytest.raises(Crash):
            relay.run_once()
        (crashed,) = [r for r in outbox(app, tenant["id"]) if r.kind == kind]
        assert crashed.status == "pending"
        assert crashed.attempts == 1
        assert crashed.locked_until
        assert restart().run_once().rows == []  # still leased by the dead process
        october.advance(LEASE_S + 1)
    assert [r.result for r in restart().run_once().rows] == ["done"]

    assert {r.status for r in outbox(app, tenant["id"])} == {"done"}
    invoice, lines = invoice_of(app, tenant["id"])
    (customer,) = customers_of(api, tenant)
    assert len(live_subscriptions(api, customer.id)) == 1
    (remote,) = stripe_invoices_of(api, customer.id, invoice.id)
    assert invoice.stripe_invoice_id == remote.id
    assert invoice.sync_status == "synced"
    remote_lines = our_lines(api, remote.id, invoice.id)
    assert len(remote_lines) == len(lines)
    assert sum(x.amount for x in remote_lines) == invoice.total


def test_crash_after_the_items_reuses_them(app: TestClient, api: stripe.StripeClient, october: FakeClock,
                                           monkeypatch: pytest.MonkeyPatch,
                                           restart: Callable[[], StripeRelay]) -> None:
    tenant = billed_october(app, october)
    relay = restart()
    create = relay._client.v1.invoices.create

    def dying(*args: Any, **kwargs: Any) -> Any:
        raise Crash("after the invoice items, before the invoice")

    monkeypatch.setattr(relay._client.v1.invoices, "create", dying)
    with pytest.raises(Crash):
        relay.run_once()
    monkeypatch.setattr(relay._client.v1.invoices, "create", create)
    october.advance(LEASE_S + 1)
    assert [r.kind for r in restart().run_once().rows] == ["invoice"]

    invoice, lines = invoice_of(app, tenant["id"])
    (customer,) = customers_of(api, tenant)
    (remote,) = stripe_invoices_of(api, customer.id, invoice.id)
    assert len(our_lines(api, remote.id, invoice.id)) == len(lines)
    assert remote.total == invoice.total


# --- Stripe unreachable -----------------------------------------------------------------------------------------


def test_unreachable_stripe_loses_nothing(stripe_settings: Settings, october: FakeClock,
                                          restart: Callable[[], StripeRelay], app: TestClient,
                                          api: stripe.StripeClient) -> None:
    down = stripe_settings.model_copy(update={"stripe_api_base": f"http://127.0.0.1:{free_port()}"})
    services = services_of(app.app)
    dead = relay_from_settings(down, sessions=services.sessions, catalog=services.plans)
    assert dead is not None
    tenant = billed_october(app, october)
    try:
        report = dead.tick()
        again = dead.tick()
    finally:
        dead.close()
    assert [(r.kind, r.result) for r in report.rows] == [("customer", "retry")]
    assert again.rows == []
    customer, subscription, invoice_row = outbox(app, tenant["id"])
    assert (customer.status, customer.attempts) == ("pending", 1)
    assert customer.next_attempt_at > october.t
    assert "APIConnectionError" in str(customer.last_error)
    assert (subscription.attempts, invoice_row.attempts) == (0, 0)  # held back behind the customer
    assert invoice_of(app, tenant["id"])[0].sync_status == "pending"

    october.advance(backoff_s(1))
    assert [r.result for r in restart().run_once().rows] == ["done", "done", "done"]
    invoice, _ = invoice_of(app, tenant["id"])
    assert invoice.sync_status == "synced"
    assert len(stripe_invoices_of(api, str(tenant_row(app, tenant["id"]).stripe_customer_id), invoice.id)) == 1


def test_relay_runs_inside_serve(stripe_settings: Settings, api: stripe.StripeClient) -> None:
    with TestClient(create_app(stripe_settings.model_copy(update={"stripe_sync_interval_s": 1}))) as client:
        tenant = new_tenant(client)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(r.status == "done" for r in outbox(client, tenant["id"])):
            time.sleep(0.1)
        assert {r.status for r in outbox(client, tenant["id"])} == {"done"}
    assert len(customers_of(api, tenant)) == 1


def test_cli_billing_sync(stripe_settings: Settings, monkeypatch: pytest.MonkeyPatch,
                          api: stripe.StripeClient) -> None:
    from modelmeter.cli import main

    env = {"MODELMETER_DATA_DIR": str(stripe_settings.data_dir), "MODELMETER_DATABASE_URL":
           stripe_settings.effective_database_url, "MODELMETER_STRIPE_API_KEY": "sk_test_modelmeter",
           "MODELMETER_STRIPE_API_BASE": str(stripe_settings.stripe_api_base)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    created = runner.invoke(main, ["tenant", "create", "--name", "Cli", "--email", f"{uuid.uuid4().hex}@x.io",
                                   "--json"])
    assert created.exit_code == 0, created.output
    tenant = json.loads(created.stdout)
    synced = runner.invoke(main, ["billing", "sync", "--json"])
    assert synced.exit_code == 0, synced.output
    assert json.loads(synced.stdout)["sent"] == 2
    assert len(customers_of(api, tenant)) == 1
    human = runner.invoke(main, ["billing", "sync"])
    assert human.exit_code == 0
    assert "sent 0, retrying 0, failed 0" in human.output
    monkeypatch.delenv("MODELMETER_STRIPE_API_KEY")
    off = runner.invoke(main, ["billing", "sync"])
    assert off.exit_code == 1
    assert "Stripe is off" in off.output


# --- webhooks ---------------------------------------------------------------------------------------------------



def invoice_event(kind: str, invoice_id: str, created: int, event_id: str | None = None) -> str:
    obj = {"id": f"in_{invoice_id}", "object": "invoice", "customer": "cus_elsewhere",
           "metadata": {"mm_invoice_id": invoice_id}, "status_transitions": {"paid_at": created}}
    if kind == "invoice.payment_failed":
        obj["status_transitions"] = {"paid_at": None}
    return event(kind, obj, created, event_id)



@pytest.fixture
def billed(app: TestClient, october: FakeClock) -> dict[str, Any]:
    """A tenant (not synced: webhooks need only our invoice ids) with October and November invoices."""
    tenant = new_tenant(app)
    use(app, tenant, ts(2026, 10, 3), tokens=1000)
    use(app, tenant, ts(2026, 11, 3), tokens=2000)
    october.t = ts(2026, 12, 2)
    close(app, "2026-10")
    close(app, "2026-11")
    with db(app) as session:
        tenant["invoices"] = list(session.exec(select(Invoice.id).where(Invoice.tenant_id == tenant["id"])
                                               .order_by(col(Invoice.period))).all())
    return tenant


@pytest.mark.parametrize("case", ["wrong_secret", "missing", "stale", "tampered", "garbage"])
def test_bad_signatures_are_400_and_write_nothing(app: TestClient, billed: dict[str, Any], case: str) -> None:
    payload = invoice_event("invoice.paid", billed["invoices"][0], int(time.time()))
    signature = {
        "wrong_secret": sign(payload, "whsec_not_ours"),
        "missing": "",
        "stale": sign(payload, at=int(time.time()) - 301),
        "tampered": sign(payload),
        "garbage": "t=abc,v1=zzz",
    }[case]
    body = payload.replace('"invoice.paid"', '"invoice.paid" ') if case == "tampered" else payload
    headers = {"content-type": "application/json"} | ({"stripe-signature": signature} if signature else {})
    response = app.post("/webhooks/stripe", content=body, headers=headers)
    assert_envelope(response, 400, type_="invalid_request_error", code="invalid_signature")
    assert events_recorded(app) == 0
    assert invoice_of_id(app, billed["invoices"][0]).status == "open"


def invoice_of_id(client: TestClient, invoice_id: str) -> Invoice:
    with db(client) as session:
        invoice = session.get(Invoice, invoice_id)
        assert invoice is not None
        return invoice


def test_valid_signature_applies_once(app: TestClient, billed: dict[str, Any]) -> None:
    at = int(time.time())
    payload = invoice_event("invoice.paid", billed["invoices"][0], at, "evt_once")
    first = deliver(app, payload)
    assert first.status_code == 200
    assert first.json() == {"received": True, "outcome": "applied"}
    assert deliver(app, payload).json() == {"received": True, "outcome": "duplicate"}
    invoice = invoice_of_id(app, billed["invoices"][0])
    assert (invoice.status, invoice.paid_at) == ("paid", at)
    assert events_recorded(app) == 1
    not_json = "{not json"
    assert_envelope(deliver(app, not_json), 400, code="malformed_request")


def test_unconfigured_webhooks_are_refused(app_factory: Callable[..., Any]) -> None:
    with TestClient(app_factory(), raise_server_exceptions=False) as client:
        payload = event("invoice.paid", {"id": "in_x"}, int(time.time()))
        assert_envelope(deliver(client, payload), 503, code="webhooks_not_configured")


def test_event_for_an_unknown_customer_changes_nothing(app: TestClient, billed: dict[str, Any]) -> None:
    for kind in HANDLED_EVENTS:
        obj = {"id": "in_or_sub_unknown", "customer": "cus_unknown", "metadata": {}}
        response = deliver(app, event(kind, obj, int(time.time())))
        assert response.status_code == 200
        assert response.json()["outcome"] == "unknown_customer"
    assert deliver(app, event("charge.refunded", {"id": "ch_1"}, 1)).json()["outcome"] == "unhandled"
    assert events_recorded(app) == 0
    assert tenant_row(app, billed["id"]).billing_status == "ok"
    assert {invoice_of_id(app, i).status for i in billed["invoices"]} == {"open"}


def test_failed_payment_past_due_then_suspended_after_grace(app: TestClient, billed: dict[str, Any],
                                                            october: FakeClock, make_key_for: Any) -> None:
    key = make_key_for(billed["id"])
    failed_at = october.t
    assert deliver(app, invoice_event("invoice.payment_failed", billed["invoices"][0], failed_at)).status_code == 200
    tenant = app.get(f"/admin/tenants/{billed['id']}", headers=ADMIN).json()
    assert (tenant["billing_status"], tenant["status"]) == ("past_due", "active")
    assert tenant_row(app, billed["id"]).past_due_since == failed_at
    assert app.get("/v1/billing/invoices", headers=key).status_code == 200

    october.advance(GRACE_S - 1)
    assert relay_of(app).enforce_grace() == []
    october.advance(1)
    assert relay_of(app).enforce_grace() == [billed["id"]]
    assert tenant_row(app, billed["id"]).status == "suspended"
    assert_envelope(app.get("/v1/billing/invoices", headers=key), 403, code="tenant_suspended")

    assert deliver(app, invoice_event("invoice.paid", billed["invoices"][0], october.t)).status_code == 200
    row = tenant_row(app, billed["id"])
    assert (row.billing_status, row.past_due_since, row.status) == ("ok", None, "active")
    assert app.get("/v1/billing/invoices", headers=key).status_code == 200


def test_grace_is_also_enforced_on_the_next_event(app: TestClient, billed: dict[str, Any], october: FakeClock,
                                                  make_key_for: Any) -> None:
    key = make_key_for(billed["id"])
    deliver(app, invoice_event("invoice.payment_failed", billed["invoices"][0], october.t))
    assert app.get("/v1/billing/invoices", headers=key).status_code == 200  # cached as active
    october.advance(GRACE_S)
    deliver(app, invoice_event("invoice.payment_failed", billed["invoices"][1], october.t))
    assert_envelope(app.get("/v1/billing/invoices", headers=key), 403, code="tenant_suspended")


def _final_state(client: TestClient, tenant: dict[str, Any]) -> tuple[Any, ...]:
    row = tenant_row(client, tenant["id"])
    invoices = [invoice_of_id(client, i) for i in tenant["invoices"]]
    return (row.billing_status, row.past_due_since, row.status,
            [(i.status, i.paid_at, i.payment_failed_at) for i in invoices])


def test_repeated_and_reordered_webhooks_give_the_same_state(app: TestClient, october: FakeClock) -> None:
    t0 = ts(2026, 12, 3)
    tenants = []
    october.t = ts(2026, 10, 1)
    for _ in range(6):
        tenants.append(new_tenant(app))
        use(app, tenants[-1], ts(2026, 10, 3), tokens=500)
        use(app, tenants[-1], ts(2026, 11, 3), tokens=700)
    october.t = t0
    close(app, "2026-10")
    close(app, "2026-11")
    states = []
    for tenant, order in zip(tenants, itertools.permutations(range(3)), strict=True):
        with db(app) as session:
            tenant["invoices"] = list(session.exec(select(Invoice.id).where(Invoice.tenant_id == tenant["id"])
                                                   .order_by(col(Invoice.period))).all())
        october_invoice, november_invoice = tenant["invoices"]
        events = [  # October: failed, then paid on the retry; November: failed, still unpaid
            invoice_event("invoice.payment_failed", october_invoice, t0 + 10),
            invoice_event("invoice.paid", october_invoice, t0 + 20),
            invoice_event("invoice.payment_failed", november_invoice, t0 + 30),
        ]
        for index in order:
            assert deliver(app, events[index]).status_code == 200
            assert deliver(app, events[index]).json()["outcome"] == "duplicate"
        states.append(_final_state(app, tenant))
    assert all(state == states[0] for state in states), states
    assert states[0] == ("past_due", t0 + 30, "active",
                         [("paid", t0 + 20, t0 + 10), ("open", None, t0 + 30)])


def test_an_older_failure_after_the_payment_does_not_set_past_due(app: TestClient, billed: dict[str, Any],
                                                                   october: FakeClock) -> None:
    invoice_id = billed["invoices"][0]
    deliver(app, invoice_event("invoice.paid", invoice_id, october.t))
    outcome = deliver(app, invoice_event("invoice.payment_failed", invoice_id, october.t - 60)).json()["outcome"]
    assert outcome == "stale"
    assert tenant_row(app, billed["id"]).billing_status == "ok"


def test_subscription_deleted_suspends_only_the_current_one(app: TestClient, api: stripe.StripeClient,
                                                            make_key_for: Any) -> None:
    tenant = new_tenant(app, "payg")
    key = make_key_for(tenant["id"])
    relay_of(app).tick()
    old = api.v1.subscriptions.retrieve(str(tenant_row(app, tenant["id"]).stripe_subscription_id))
    app.patch(f"/admin/tenants/{tenant['id']}", json={"plan": "pro"}, headers=ADMIN)
    relay_of(app).tick()
    current = api.v1.subscriptions.retrieve(str(tenant_row(app, tenant["id"]).stripe_subscription_id))

    superseded = deliver(app, event("customer.subscription.deleted", old.to_dict(), int(time.time())))
    assert superseded.json()["outcome"] == "superseded"
    assert tenant_row(app, tenant["id"]).status == "active"
    assert app.get("/v1/billing/invoices", headers=key).status_code == 200
    deleted = deliver(app, event("customer.subscription.deleted", current.to_dict(), int(time.time())))
    assert deleted.json()["outcome"] == "applied"
    row = tenant_row(app, tenant["id"])
    assert (row.status, row.suspension_reason, row.stripe_subscription_id) == (
        "suspended", "subscription_deleted", None)
    assert_envelope(app.get("/v1/billing/invoices", headers=key), 403, code="tenant_suspended")


# --- configuration ----------------------------------------------------------------------------------------------


def test_live_keys_need_live_mode(settings: Settings) -> None:
    live = settings.model_copy(update={"stripe_api_key": "sk_live_nope"})
    with pytest.raises(StripeConfigError, match="test-mode key"):
        create_app(live)
    relay = services_of(create_app(live.model_copy(update={"stripe_live_mode": True}))).stripe
    assert relay is not None
    relay.close()


def test_no_outbox_without_stripe(client: TestClient) -> None:
    response = client.post("/admin/tenants", json={"name": "Off", "email": "off@example.com"}, headers=ADMIN)
    with services_of(client.app).sessions() as session:
        assert session.exec(select(StripeOutbox)).all() == []
    assert response.json()["stripe_customer_id"] is None


@pytest.mark.skipif(not ON_POSTGRES, reason="concurrent writers need PostgreSQL (SQLite has one writer)")
def test_concurrent_deliveries_apply_once_and_serialise_per_tenant(app: TestClient, billed: dict[str, Any],
                                                                    october: FakeClock) -> None:
    october_invoice, november_invoice = billed["invoices"]
    deliver(app, invoice_event("invoice.payment_failed", october_invoice, october.t))
    same = invoice_event("invoice.paid", october_invoice, october.t + 10, "evt_same")
    other = invoice_event("invoice.payment_failed", november_invoice, october.t + 20)
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = [f.result().json()["outcome"] for f in [pool.submit(deliver, app, p) for p in [same] * 7 + [other]]]
    assert sorted(outcomes) == ["applied", "applied"] + ["duplicate"] * 6
    row = tenant_row(app, billed["id"])
    assert (row.billing_status, row.past_due_since) == ("past_due", october.t + 20)
    assert invoice_of_id(app, october_invoice).status == "paid"


def test_run_once_drains_in_batches(app: TestClient) -> None:
    tenants = [new_tenant(app) for _ in range(3)]
    services = services_of(app.app)
    client, close_client = make_client(services.settings)
    relay = StripeRelay(client=client, sessions=services.sessions, catalog=services.plans, batch=2)
    try:
        assert [r.result for r in relay.run_once().rows] == ["done"] * 6
    finally:
        close_client()
    assert all(tenant_row(app, t["id"]).stripe_subscription_id for t in tenants)


def test_a_failed_invoice_shows_failed_and_retries_on_request(app: TestClient, api: stripe.StripeClient,
                                                              october: FakeClock,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = billed_october(app, october)
    relay = relay_of(app)

    def refuse(*args: Any) -> Any:
        raise PermanentSyncError("amounts differ")

    monkeypatch.setattr(relay, "_check_amounts", refuse)
    assert [r.result for r in relay.tick().rows] == ["done", "done", "failed"]
    invoice, _ = invoice_of(app, tenant["id"])
    assert invoice.sync_status == "failed"
    assert "amounts differ" in str(outbox(app, tenant["id"])[-1].last_error)
    assert relay.tick().rows == []  # failed rows wait for an operator
    monkeypatch.undo()
    assert [r.result for r in relay.tick(retry_failed=True).rows] == ["done"]
    invoice, lines = invoice_of(app, tenant["id"])
    (customer,) = customers_of(api, tenant)
    (remote,) = stripe_invoices_of(api, customer.id, invoice.id)
    assert invoice.sync_status == "synced"
    assert len(our_lines(api, remote.id, invoice.id)) == len(lines)
