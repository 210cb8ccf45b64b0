"""Prepaid credits through Stripe, against localstripe: a purchase becomes a Stripe invoice of exactly its amount,
the signed ``invoice.paid`` grants the credits once (replays and second events add nothing), a webhook for an
invoice we do not know changes nothing, refused purchases write nothing, and a closed invoice that applied credits
reaches Stripe with its negative ``Credits applied`` line, its total exactly ours and never below zero.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import stripe
from fastapi.testclient import TestClient
from sqlmodel import col, select

from modelmeter.billing.stripe.relay import LEASE_S, StripeRelay
from modelmeter.billing.tables import CreditGrant, CreditPurchase, StripeOutbox
from tests.conftest import ADMIN, ON_POSTGRES, FakeClock, assert_envelope, bearer
from tests.integration.conftest import (
    close,
    customers_of,
    db,
    deliver,
    event,
    invoice_of,
    meta,
    new_tenant,
    our_lines,
    outbox,
    relay_of,
    stripe_invoices_of,
    tenant_row,
    ts,
)

pytest.importorskip("localstripe")


@pytest.fixture
def client(app: TestClient) -> TestClient:
    """The Stripe-configured app is the client (so ``register_model`` registers models in its database)."""
    return app


def purchase(client: TestClient, headers: dict[str, str], amount_cents: int, **extra: str) -> Any:
    return client.post("/v1/billing/credits/purchase", json={"amount_cents": amount_cents},
                       headers=headers | extra)


def purchases(client: TestClient, tenant_id: str) -> list[CreditPurchase]:
    with db(client) as session:
        query = select(CreditPurchase).where(CreditPurchase.tenant_id == tenant_id).order_by(col(CreditPurchase.id))
        return list(session.exec(query).all())


def grants(client: TestClient, tenant_id: str) -> list[CreditGrant]:
    with db(client) as session:
        return list(session.exec(select(CreditGrant).where(CreditGrant.tenant_id == tenant_id)).all())


def purchase_invoices(api: stripe.StripeClient, customer_id: str, purchase_id: str) -> list[stripe.Invoice]:
    return stripe_invoices_of(api, customer_id, purchase_id, key="mm_purchase_id")


def purchase_lines(api: stripe.StripeClient, stripe_invoice_id: str, purchase_id: str) -> list[Any]:
    return our_lines(api, stripe_invoice_id, purchase_id, key="mm_purchase_id")


def pay_in_stripe(api: stripe.StripeClient, customer_id: str, stripe_invoice_id: str) -> dict[str, Any]:
    """The customer pays the invoice with a test card; the paid invoice as Stripe's webhook would carry it."""
    card = api.v1.payment_methods.create(params={"type": "card", "card": {
        "number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}})
    api.v1.payment_methods.attach(card.id, params={"customer": customer_id})
    api.v1.customers.update(customer_id, params={"invoice_settings": {"default_payment_method": card.id}})
    api.v1.invoices.pay(stripe_invoice_id)
    paid = api.v1.invoices.retrieve(stripe_invoice_id)
    assert paid.status == "paid"
    return paid.to_dict()


def bought(app: TestClient, api: stripe.StripeClient, tenant: dict[str, Any], headers: dict[str, str],
           amount_cents: int) -> tuple[str, dict[str, Any]]:
    """A purchase sent to Stripe and paid there: its id, and the paid Stripe invoice."""
    response = purchase(app, headers, amount_cents)
    assert response.status_code == 201, response.text
    assert {r.result for r in relay_of(app).tick().rows} == {"done"}
    customer_id = str(tenant_row(app, tenant["id"]).stripe_customer_id)
    (remote,) = purchase_invoices(api, customer_id, response.json()["id"])
    assert remote.id is not None
    return response.json()["id"], pay_in_stripe(api, customer_id, remote.id)


def balance(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get("/v1/billing/credits", headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


# --- a purchase, end to end -------------------------------------------------------------------------------------


def test_purchase_is_invoiced_in_stripe_and_granted_once_when_paid(app: TestClient, api: stripe.StripeClient,
                                                                   make_key_for: Any) -> None:
    tenant = new_tenant(app)
    key = make_key_for(tenant["id"])
    first = purchase(app, key, 2500, **{"Idempotency-Key": "top-up-1"})
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["object"], body["amount_cents"], body["currency"], body["status"]) == (
        "credit_purchase", 2500, "usd", "pending")
    assert (body["credit_grant"], body["paid_at"]) == (None, None)
    retried = purchase(app, key, 2500, **{"Idempotency-Key": "top-up-1"})
    assert retried.status_code == 201
    assert retried.headers.get("idempotent-replayed") == "true"
    assert retried.json() == body
    assert [p.id for p in purchases(app, tenant["id"])] == [body["id"]]
    assert [(r.kind, r.object_id, r.idempotency_key) for r in outbox(app, tenant["id"])][2:] == [
        ("credit_purchase", body["id"], f"mm-credit_purchase-{body['id']}")]

    assert [(r.kind, r.result) for r in relay_of(app).tick().rows] == [
        ("customer", "done"), ("subscription", "done"), ("credit_purchase", "done")]
    (customer,) = customers_of(api, tenant)
    (remote,) = purchase_invoices(api, customer.id, body["id"])
    assert remote.id is not None
    assert meta(remote) == {"mm_purchase_id": body["id"], "tenant_id": tenant["id"]}
    (line,) = purchase_lines(api, remote.id, body["id"])
    assert (line.amount, line.description, meta(line)) == (
        2500, "Prepaid credits", {"mm_purchase_id": body["id"], "tenant_id": tenant["id"]})
    assert remote.total == 2500
    assert purchases(app, tenant["id"])[0].stripe_invoice_id == remote.id
    assert balance(app, key) == {"object": "list", "data": [], "has_more": False, "balance_cents": 0}

    paid = pay_in_stripe(api, customer.id, remote.id)
    payload = event("invoice.paid", paid, int(paid["status_transitions"]["paid_at"]), "evt_paid_once")
    assert deliver(app, payload).json() == {"received": True, "outcome": "applied"}
    listed = balance(app, key)
    (granted,) = listed["data"]
    assert (granted["source"], granted["amount_cents"], granted["remaining_cents"], granted["status"]) == (
        "purchased", 2500, 2500, "active")
    assert listed["balance_cents"] == 2500
    stored = purchases(app, tenant["id"])[0]
    assert (stored.status, stored.grant_id, stored.paid_at) == ("paid", granted["id"],
                                                               paid["status_transitions"]["paid_at"])

    assert deliver(app, payload).json()["outcome"] == "duplicate"  # the same event again
    again = json.loads(payload) | {"id": "evt_paid_twice"}  # another event for the same invoice, named by its id only
    again["data"]["object"]["metadata"] = {}
    assert deliver(app, json.dumps(again)).json()["outcome"] == "duplicate"
    assert balance(app, key)["balance_cents"] == 2500
    assert len(grants(app, tenant["id"])) == 1
    assert [r.status for r in outbox(app, tenant["id"])] == ["done"] * 3  # nothing more to send


@pytest.mark.skipif(not ON_POSTGRES, reason="concurrent writers need PostgreSQL (SQLite has one writer)")
def test_concurrent_paid_events_grant_once(app: TestClient, api: stripe.StripeClient, make_key_for: Any) -> None:
    tenant = new_tenant(app)
    key = make_key_for(tenant["id"])
    _, paid = bought(app, api, tenant, key, 800)
    payloads = [event("invoice.paid", paid, int(paid["status_transitions"]["paid_at"])) for _ in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = sorted(r.json()["outcome"] for r in pool.map(lambda p: deliver(app, p), payloads))
    assert outcomes == ["applied"] + ["duplicate"] * 5
    assert len(grants(app, tenant["id"])) == 1
    assert balance(app, key)["balance_cents"] == 800


def test_sending_a_purchase_again_creates_nothing_twice(app: TestClient, api: stripe.StripeClient,
                                                        make_key_for: Any) -> None:
    tenant = new_tenant(app)
    key = make_key_for(tenant["id"])
    purchase_id = purchase(app, key, 1000).json()["id"]
    relay_of(app).tick()
    with db(app) as session:  # as if the mark had been lost
        row = session.exec(select(StripeOutbox).where(StripeOutbox.kind == "credit_purchase",
                                                      StripeOutbox.object_id == purchase_id)).one()
        row.status = "pending"
        session.add(row)
        session.commit()
    assert [r.result for r in relay_of(app).tick().rows] == ["done"]
    (customer,) = customers_of(api, tenant)
    (remote,) = purchase_invoices(api, customer.id, purchase_id)
    assert remote.id is not None
    assert [x.amount for x in purchase_lines(api, remote.id, purchase_id)] == [1000]


class Crash(BaseException):
    """The process dies (not an error the relay could handle)."""


def test_crash_between_the_item_and_the_invoice_reuses_the_item(
        app: TestClient, api: stripe.StripeClient, make_key_for: Any, fake_clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch, restart: Callable[[], StripeRelay]) -> None:
    tenant = new_tenant(app)
    relay_of(app).tick()
    purchase_id = purchase(app, make_key_for(tenant["id"]), 700).json()["id"]
    relay = restart()

    def dying(*args: Any, **kwargs: Any) -> Any:
        raise Crash("after the invoice item, before the invoice")

    monkeypatch.setattr(relay._client.v1.invoices, "create", dying)
    with pytest.raises(Crash):
        relay.run_once()
    monkeypatch.undo()
    fake_clock.advance(LEASE_S + 1)
    assert [(r.kind, r.result) for r in restart().run_once().rows] == [("credit_purchase", "done")]
    (customer,) = customers_of(api, tenant)
    (remote,) = purchase_invoices(api, customer.id, purchase_id)
    assert remote.id is not None
    assert [x.amount for x in purchase_lines(api, remote.id, purchase_id)] == [700]
    assert remote.total == 700


# --- webhooks that must change nothing --------------------------------------------------------------------------


def test_paid_webhook_for_an_unknown_invoice_changes_nothing(app: TestClient, api: stripe.StripeClient,
                                                              make_key_for: Any) -> None:
    tenant = new_tenant(app)
    key = make_key_for(tenant["id"])
    purchase(app, key, 900)
    relay_of(app).tick()
    customer_id = str(tenant_row(app, tenant["id"]).stripe_customer_id)
    before = [p.model_dump() for p in purchases(app, tenant["id"])]
    at = ts(2026, 10, 5)
    unknown: list[tuple[str, str, dict[str, str], str]] = [
        ("in_not_ours", customer_id, {}, "ignored"),  # a customer of ours, an invoice we did not make
        ("in_not_ours_2", customer_id, {"mm_purchase_id": "cp_nope"}, "ignored"),
        ("in_nobody", "cus_nobody", {"mm_purchase_id": "cp_nope"}, "unknown_customer"),
    ]
    for invoice_id, customer, metadata, outcome in unknown:
        obj = {"id": invoice_id, "object": "invoice", "customer": customer, "metadata": metadata, "status": "paid",
               "amount_paid": 900, "status_transitions": {"paid_at": at}}
        assert deliver(app, event("invoice.paid", obj, at)).json()["outcome"] == outcome
    assert [p.model_dump() for p in purchases(app, tenant["id"])] == before
    assert grants(app, tenant["id"]) == []
    assert balance(app, key)["balance_cents"] == 0
    row = tenant_row(app, tenant["id"])
    assert (row.status, row.billing_status, row.credits_epoch) == ("active", "ok", 0)


def test_failed_top_up_payment_grants_nothing_and_is_no_debt(app: TestClient, api: stripe.StripeClient,
                                                              make_key_for: Any) -> None:
    tenant = new_tenant(app)
    key = make_key_for(tenant["id"])
    purchase_id = purchase(app, key, 600).json()["id"]
    relay_of(app).tick()
    customer_id = str(tenant_row(app, tenant["id"]).stripe_customer_id)
    (remote,) = purchase_invoices(api, customer_id, purchase_id)
    assert remote.id is not None
    failed = remote.to_dict() | {"status": "open", "attempted": True}
    at = ts(2026, 10, 6)
    assert deliver(app, event("invoice.payment_failed", failed, at)).json()["outcome"] == "ignored"
    (stored,) = purchases(app, tenant["id"])
    assert (stored.status, stored.grant_id) == ("pending", None)
    row = tenant_row(app, tenant["id"])
    assert (row.status, row.billing_status, row.past_due_since) == ("active", "ok", None)
    assert app.get("/v1/billing/credits", headers=key).status_code == 200

    paid = pay_in_stripe(api, customer_id, remote.id)  # the retry succeeds
    assert deliver(app, event("invoice.paid", paid, at + 60)).json()["outcome"] == "applied"
    assert balance(app, key)["balance_cents"] == 600


# --- refusals write nothing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [499, 0, -500, 500.5, "500", None, 1_000_001])
def test_purchase_out_of_bounds_is_422_and_writes_nothing(app: TestClient, make_key_for: Any, amount: Any) -> None:
    tenant = new_tenant(app)
    key = make_key_for(tenant["id"])
    response = app.post("/v1/billing/credits/purchase", json={"amount_cents": amount}, headers=key)
    assert_envelope(response, 422, type_="invalid_request_error")
    assert purchases(app, tenant["id"]) == []
    assert [r.kind for r in outbox(app, tenant["id"])] == ["customer", "subscription"]


def test_purchase_needs_billing_write(app: TestClient) -> None:
    tenant = new_tenant(app)
    made = app.post(f"/admin/tenants/{tenant['id']}/keys", json={"scopes": ["inference", "billing:read"]},
                    headers=ADMIN)
    assert made.status_code == 201, made.text
    key = bearer(made.json()["key"])
    assert_envelope(purchase(app, key, 1000), 403, type_="permission_error", code="insufficient_scope")
    assert app.get("/v1/billing/credits", headers=key).status_code == 200  # reading needs only billing:read
    assert purchases(app, tenant["id"]) == []
    assert [r.kind for r in outbox(app, tenant["id"])] == ["customer", "subscription"]


# --- credits applied on a closed invoice reach Stripe exactly ---------------------------------------------------


def classify_batch(client: TestClient, headers: dict[str, str], model: str, words: int) -> None:
    text = " ".join(["meter"] * words)
    response = client.post("/v1/classify", json={"model": model, "input": [text] * 8}, headers=headers)
    assert response.status_code == 200, response.text


def test_closed_invoice_with_credits_reaches_stripe_exactly(
        app: TestClient, api: stripe.StripeClient, october: FakeClock, make_key_for: Any,
        register_model: Callable[..., str], one_torch_thread: None) -> None:
    october.t = ts(2026, 10, 2)
    partly = new_tenant(app)  # an operator's grant pays part of the usage
    partly_key = make_key_for(partly["id"])
    granted = app.post(f"/admin/tenants/{partly['id']}/credits", json={"amount_cents": 3}, headers=ADMIN)
    assert granted.status_code == 201, granted.text
    wholly = new_tenant(app)  # bought credits pay all of it
    wholly_key = make_key_for(wholly["id"])
    model = register_model(None)
    assert balance(app, wholly_key)["balance_cents"] == 0  # the key is cached before the credits exist
    _, paid = bought(app, api, wholly, wholly_key, 500)
    assert deliver(app, event("invoice.paid", paid, october.t)).json()["outcome"] == "applied"

    october.t = ts(2026, 10, 12)
    for key in (partly_key, wholly_key):
        for _ in range(3):
            classify_batch(app, key, model, 200)
    assert balance(app, partly_key)["balance_cents"] == 0
    assert 0 < balance(app, wholly_key)["balance_cents"] < 500
    october.t = ts(2026, 11, 2)
    close(app, "2026-10")
    relay_of(app).tick()

    for tenant in (partly, wholly):
        invoice, lines = invoice_of(app, tenant["id"])
        assert invoice.sync_status == "synced"
        assert [line.code for line in lines][-1] == "credits"
        credit = lines[-1]
        assert (credit.description, credit.amount < 0) == ("Credits applied", True)
        assert invoice.total == invoice.subtotal + credit.amount >= 0
        customer_id = str(tenant_row(app, tenant["id"]).stripe_customer_id)
        (remote,) = stripe_invoices_of(api, customer_id, invoice.id)
        assert remote.id == invoice.stripe_invoice_id
        remote_lines = our_lines(api, remote.id, invoice.id)
        assert sorted((int(meta(x)["mm_line"]), x.amount) for x in remote_lines) == [
            (x.position, x.amount) for x in lines]
        assert remote.total == invoice.total
    partly_invoice, partly_lines = invoice_of(app, partly["id"])
    assert (partly_lines[-1].amount, partly_invoice.total > 0) == (-3, True)
    wholly_invoice, wholly_lines = invoice_of(app, wholly["id"])
    assert wholly_lines[-1].amount == -wholly_invoice.subtotal  # payg has no base fee: credits paid everything
    assert wholly_invoice.total == 0
