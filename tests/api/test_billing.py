"""Billing through the API with a controlled clock: usage, subscription, upcoming invoice, closing periods."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelmeter.gateway.services import Services
from tests.conftest import ADMIN, FakeClock, assert_envelope, bearer


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


@pytest.fixture
def october(fake_clock: FakeClock) -> FakeClock:
    fake_clock.t = ts(2026, 10, 1, 0, 0, 0)
    return fake_clock


@pytest.fixture
def payg(client: TestClient, make_tenant: Any, make_key: Any, register_model: Any, october: FakeClock) -> Any:
    tenant = make_tenant(plan="payg")
    key = make_key(tenant["id"])
    model = register_model(tenant["id"])
    return tenant, bearer(key["key"]), model, key["id"]


def classify(client: TestClient, headers: dict[str, str], model: str, text: str | list[str]) -> dict[str, Any]:
    response = client.post("/v1/classify", json={"model": model, "input": text}, headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def test_close_bills_october_once_and_late_usage_moves_on(client: TestClient, payg: Any, october: FakeClock,
                                                          services: Services) -> None:
    tenant, headers, model, _ = payg
    october.t = ts(2026, 10, 10)
    tokens = sum(classify(client, headers, model, t)["usage"]["total_tokens"] for t in ("one", "two words", "x"))
    october.t = ts(2026, 10, 31, 23, 59, 0)
    assert_envelope(client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN), 409,
                    code="period_not_ended")
    october.t = ts(2026, 11, 2)
    first = client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN).json()
    again = client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN).json()
    assert (first["invoices"], first["already_closed"]) == (1, False)
    assert (again["invoices"], again["already_closed"]) == (1, True)

    (invoice,) = client.get("/v1/billing/invoices", headers=headers).json()["data"]
    assert (invoice["period"], invoice["status"], invoice["currency"]) == ("2026-10", "open", "usd")
    lines = {line["code"]: line for line in invoice["lines"]["data"]}
    assert lines["requests"]["quantity"] == 3
    assert lines["tokens"]["quantity"] == tokens
    # payg: $0.0005 per request, $0.0200 per 1k tokens; each line rounded once, half up.
    assert lines["requests"]["amount"] == half_up(Decimal("0.05") * 3)
    assert lines["tokens"]["amount"] == half_up(Decimal("0.002") * tokens)
    assert invoice["total"] == invoice["subtotal"] == sum(line["amount"] for line in invoice["lines"]["data"])

    # A request served in October but recorded after the close lands in November.
    from modelmeter.billing.ledger import UsageRecord, record_usage

    with services.sessions() as session:
        record_usage(session=session, records=[UsageRecord(request_id="late", tenant_id=tenant["id"], model_id=model,
                                                           created=ts(2026, 10, 31, 23, 59, 59), tokens=7,
                                                           plan="payg")])
        session.commit()
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    assert upcoming["period"] == "2026-11"
    assert upcoming["status"] == "draft"
    assert {line["code"]: line["quantity"] for line in upcoming["lines"]["data"]}["tokens"] == 7
    assert len(client.get("/v1/billing/invoices", headers=headers).json()["data"]) == 1


@pytest.mark.parametrize("period", ["2026-13", "26-10", "2026-1", "october", ""])
def test_malformed_period_is_422(client: TestClient, period: str) -> None:
    assert_envelope(client.post("/admin/billing/close", json={"period": period}, headers=ADMIN), 422)


def test_invoice_lines_recompute_from_plans_and_usage_api(client: TestClient, payg: Any, october: FakeClock) -> None:
    _, headers, model, _ = payg
    for day in (3, 9, 20):
        october.t = ts(2026, 10, day, 12)
        classify(client, headers, model, ["alpha beta", "gamma", "delta epsilon zeta"])
    october.t = ts(2026, 11, 1, 0, 0, 1)
    client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN)
    invoice = client.get("/v1/billing/invoices", headers=headers).json()["data"][0]

    plan = next(p for p in client.get("/admin/plans", headers=ADMIN).json()["data"] if p["id"] == "payg")
    usage = client.get(f"/v1/usage?start_time={ts(2026, 10, 1)}&end_time={ts(2026, 11, 1)}&bucket_width=1d"
                       f"&group_by=plan", headers=headers).json()
    totals = {"requests": 0, "tokens": 0}
    for bucket in usage["data"]:
        for result in bucket["results"]:
            totals["requests"] += result["requests"]
            totals["tokens"] += result["tokens"]
    assert len(usage["data"]) == 3
    assert totals["requests"] == 3
    per_token_cents = Decimal(plan["price_per_1k_tokens"]) * 100 / 1000
    per_request_cents = Decimal(plan["price_per_request"]) * 100
    expected = {"tokens": half_up(totals["tokens"] * per_token_cents),
                "requests": half_up(totals["requests"] * per_request_cents)}
    assert {line["code"]: line["amount"] for line in invoice["lines"]["data"]} == expected
    exact = sum(Decimal(r["cost_cents_decimal"]) for b in usage["data"] for r in b["results"])
    # Bucket costs are exact; the invoice rounds each line once, so they differ by at most half a cent a line.
    assert abs(exact - invoice["total"]) <= Decimal("0.5") * len(invoice["lines"]["data"])
    assert exact == totals["tokens"] * per_token_cents + totals["requests"] * per_request_cents


def test_usage_buckets_grouping_and_validation(client: TestClient, payg: Any, october: FakeClock) -> None:
    _, headers, model, key_id = payg
    october.t = ts(2026, 10, 5, 10, 30)
    classify(client, headers, model, "first")
    october.t = ts(2026, 10, 5, 11, 5)
    classify(client, headers, model, ["second", "third"])
    hourly = client.get(f"/v1/usage?start_time={ts(2026, 10, 5)}&end_time={ts(2026, 10, 6)}&bucket_width=1h"
                        f"&group_by=model", headers=headers).json()
    assert [b["start_time"] for b in hourly["data"]] == [ts(2026, 10, 5, 10), ts(2026, 10, 5, 11)]
    assert [b["results"][0]["requests"] for b in hourly["data"]] == [1, 1]
    assert hourly["data"][0]["results"][0]["model"] == model
    by_key = client.get(f"/v1/usage?start_time={ts(2026, 10, 1)}&group_by=key", headers=headers).json()
    assert by_key["data"][0]["results"][0]["key_id"] == key_id
    # Any range the schema allows is answered: a reversed one is empty, a wide one comes a span at a time.
    reversed_range = client.get(f"/v1/usage?start_time={ts(2026, 10, 6)}&end_time={ts(2026, 10, 5)}",
                                headers=headers).json()
    assert (reversed_range["data"], reversed_range["has_more"]) == ([], False)
    hours = f"/v1/usage?start_time={ts(2026, 9, 20)}&end_time={ts(2026, 10, 31)}&bucket_width=1h"
    first = client.get(hours, headers=headers).json()
    assert first["has_more"] is True
    assert [b["start_time"] for b in first["data"]] == [ts(2026, 10, 5, 10), ts(2026, 10, 5, 11)]
    rest = client.get(f"/v1/usage?start_time={ts(2026, 9, 20) + 31 * 86400}&end_time={ts(2026, 10, 31)}"
                      "&bucket_width=1h", headers=headers).json()
    assert (rest["data"], rest["has_more"]) == ([], False)
    assert client.get("/v1/usage?start_time=0&group_by=model", headers=headers).json()["has_more"] is True
    near_the_end = client.get(f"/v1/usage?start_time={2**31 - 100}", headers=headers).json()  # 32-bit ledger
    assert (near_the_end["data"], near_the_end["has_more"]) == ([], False)
    assert_envelope(client.get(f"/v1/usage?start_time={2**31}", headers=headers), 422)
    for query, param in [("start_time=-5", "start_time"), ("start_time=1&bucket_width=1w", "bucket_width"),
                         ("start_time=1&group_by=colour", "group_by")]:
        error = assert_envelope(client.get(f"/v1/usage?{query}", headers=headers), 422)
        assert error["param"] == param, (query, error)


def test_subscription_shows_plan_usage_and_budget(client: TestClient, payg: Any, october: FakeClock) -> None:
    tenant, headers, model, _ = payg
    client.patch(f"/admin/tenants/{tenant['id']}", json={"monthly_budget_cents": 1000}, headers=ADMIN)
    october.t = ts(2026, 10, 7)
    tokens = classify(client, headers, model, "hello there")["usage"]["total_tokens"]
    sub = client.get("/v1/billing/subscription", headers=headers).json()
    assert sub["plan"]["id"] == "payg"
    assert sub["current_period"] == "2026-10"
    assert sub["used"] == {"requests": 1, "tokens": tokens, "training_tokens": 0}
    assert sub["budget"]["monthly_budget_cents"] == 1000
    assert Decimal(sub["budget"]["spent_cents_decimal"]) == Decimal("0.05") + Decimal("0.002") * tokens


def test_plan_change_mid_period_prorates_base_fee(client: TestClient, make_tenant: Any, make_key: Any,
                                                   october: FakeClock) -> None:
    october.t = ts(2026, 10, 1)
    tenant = make_tenant(plan="payg")
    headers = bearer(make_key(tenant["id"])["key"])
    october.t = ts(2026, 10, 16, 12)  # 15.5 of 31 days on payg, then pro
    client.patch(f"/admin/tenants/{tenant['id']}", json={"plan": "pro"}, headers=ADMIN)
    october.t = ts(2026, 11, 1)
    client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN)
    invoice = client.get("/v1/billing/invoices", headers=headers).json()["data"][0]
    (fee,) = [line for line in invoice["lines"]["data"] if line["code"] == "base_fee"]
    assert fee["plan"] == "pro"
    assert fee["amount"] == 2450


def test_billing_scope_and_isolation(client: TestClient, payg: Any, make_tenant: Any, make_key: Any,
                                     october: FakeClock) -> None:
    _, headers, model, _ = payg
    october.t = ts(2026, 10, 3)
    classify(client, headers, model, "x")
    october.t = ts(2026, 11, 3)
    client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN)
    invoice_id = client.get("/v1/billing/invoices", headers=headers).json()["data"][0]["id"]
    other = make_tenant()
    other_headers = bearer(make_key(other["id"])["key"])
    assert_envelope(client.get(f"/v1/billing/invoices/{invoice_id}", headers=other_headers), 404)
    inference_only = bearer(make_key(other["id"], scopes=["inference"])["key"])
    assert_envelope(client.get("/v1/billing/subscription", headers=inference_only), 403, code="insufficient_scope")


def test_credit_purchase_without_stripe_is_409_and_writes_nothing(client: TestClient, make_tenant: Any,
                                                                  make_key: Any, services: Services) -> None:
    from sqlmodel import select

    from modelmeter.billing.tables import CreditPurchase, StripeOutbox

    tenant = make_tenant()
    headers = bearer(make_key(tenant["id"])["key"])
    response = client.post("/v1/billing/credits/purchase", json={"amount_cents": 1000}, headers=headers)
    error = assert_envelope(response, 409, type_="conflict_error", code="payments_unavailable")
    assert "credit grant" in error["message"]
    with services.sessions() as session:
        assert session.exec(select(CreditPurchase)).all() == []
        assert session.exec(select(StripeOutbox)).all() == []
    listed = client.get("/v1/billing/credits", headers=headers).json()
    assert (listed["data"], listed["balance_cents"]) == ([], 0)
