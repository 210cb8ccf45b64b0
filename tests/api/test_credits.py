"""Prepaid credits through the API on a controlled clock: grants and their validation, the draw order, expiry,
prepaid plans refusing what credits cannot pay, and invoices applying credits without going below zero."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from modelmeter.billing.tables import CreditDraw, CreditGrant, UsageEvent
from modelmeter.gateway.services import Services, services_of
from modelmeter.settings import Settings
from tests.conftest import ADMIN, REDIS_URL, FakeClock, assert_envelope, bearer
from tests.support.plans import with_plans

DIME_PLANS = [
    # 10 cents a request, tokens free: every request costs exactly one dime.
    {"id": "prepaid_dime", "name": "Prepaid dime", "price_per_request": "0.10", "rpm_limit": 100000,
     "tpm_limit": 100000000, "prepaid": True},
    {"id": "payg_dime", "name": "Dime as you go", "price_per_request": "0.10", "rpm_limit": 100000,
     "tpm_limit": 100000000, "base_fee_cents": 100},
    # Graduated request tiers: the first two requests of the month cost a dime, every later one a nickel.
    {"id": "prepaid_tiers", "name": "Prepaid tiers", "rpm_limit": 100000, "tpm_limit": 100000000, "prepaid": True,
     "request_tiers": {"tiers_mode": "graduated", "tiers": [
         {"up_to": 2, "unit_amount_decimal": "0.10"}, {"up_to": None, "unit_amount_decimal": "0.05"}]}},
    # Volume request tiers: a dime each for up to two requests in the month, a nickel each (all of them) beyond.
    {"id": "prepaid_volume", "name": "Prepaid volume", "rpm_limit": 100000, "tpm_limit": 100000000,
     "prepaid": True, "request_tiers": {"tiers_mode": "volume", "tiers": [
         {"up_to": 2, "unit_amount_decimal": "0.10"}, {"up_to": None, "unit_amount_decimal": "0.05"}]}},
    # Half a cent a request and half a cent per 1,000 tokens: lines that each round up by half a cent.
    {"id": "halves", "name": "Halves", "price_per_request": "0.005", "price_per_1k_tokens": "0.005",
     "rpm_limit": 100000, "tpm_limit": 100000000},
]


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    return with_plans(settings, tmp_path, DIME_PLANS)


@pytest.fixture
def october(fake_clock: FakeClock) -> FakeClock:
    fake_clock.t = 1_790_812_800  # 2026-10-01T00:00:00Z
    return fake_clock


Tenant = tuple[dict[str, Any], dict[str, str], str]


@pytest.fixture
def on_plan(make_tenant: Any, make_key: Any, register_model: Any, october: FakeClock) -> Callable[[str], Tenant]:
    def make(plan: str) -> Tenant:
        tenant = make_tenant(plan=plan)
        return tenant, bearer(make_key(tenant["id"])["key"]), register_model(tenant["id"])

    return make


def grant(client: TestClient, tenant_id: str, **body: Any) -> Any:
    return client.post(f"/admin/tenants/{tenant_id}/credits", json=body, headers=ADMIN)


def classify(client: TestClient, headers: dict[str, str], model: str) -> Any:
    return client.post("/v1/classify", json={"model": model, "input": "x"}, headers=headers)


def credits_of(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get("/v1/billing/credits", headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def rows(services: Services, table: Any, tenant_id: str) -> int:
    with services.sessions() as session:
        return int(session.exec(select(func.count()).select_from(table).where(table.tenant_id == tenant_id)).one())


@pytest.mark.parametrize(("body", "param"), [
    ({"amount_cents": 0}, "amount_cents"),
    ({"amount_cents": -5}, "amount_cents"),
    ({"amount_cents": 2.5}, "amount_cents"),
    ({"amount_cents": "500"}, "amount_cents"),
    ({"amount_cents": 500, "expires_at": 1_790_812_800 - 1}, "expires_at"),
    ({"amount_cents": 500, "expires_at": 1_790_812_800}, "expires_at"),  # now is already past
    ({"amount_cents": 500, "colour": "red"}, "colour"),
])
def test_bad_grants_are_refused_and_write_nothing(client: TestClient, on_plan: Callable[[str], Tenant],
                                                  services: Services, body: dict[str, Any], param: str) -> None:
    tenant, headers, _ = on_plan("payg_dime")
    error = assert_envelope(grant(client, tenant["id"], **body), 422)
    assert param in (error["param"] or ""), error
    assert rows(services, CreditGrant, tenant["id"]) == 0
    assert credits_of(client, headers) == {"object": "list", "data": [], "has_more": False, "balance_cents": 0}


def test_grant_to_unknown_tenant_is_404(client: TestClient) -> None:
    assert_envelope(grant(client, "ten_nobody", amount_cents=100), 404)


def test_grant_shape_and_listing(client: TestClient, on_plan: Callable[[str], Tenant], october: FakeClock) -> None:
    tenant, headers, _ = on_plan("payg_dime")
    created = grant(client, tenant["id"], amount_cents=250, description="welcome", expires_at=october.t + 3600)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"].startswith("cg_")
    assert {k: body[k] for k in ("object", "amount_cents", "remaining_cents", "source", "expires_at", "created",
                                 "description", "status")} == {
        "object": "credit_grant", "amount_cents": 250, "remaining_cents": 250, "source": "granted",
        "expires_at": october.t + 3600, "created": october.t, "description": "welcome", "status": "active"}
    listed = credits_of(client, headers)
    assert listed["balance_cents"] == 250
    assert [g["id"] for g in listed["data"]] == [body["id"]]
    admin_view = client.get(f"/admin/tenants/{tenant['id']}/credits", headers=ADMIN).json()
    assert admin_view == listed


def test_prepaid_plan_without_credits_serves_nothing(client: TestClient, on_plan: Callable[[str], Tenant],
                                                     services: Services) -> None:
    tenant, headers, model = on_plan("prepaid_dime")
    assert_envelope(classify(client, headers, model), 429, type_="insufficient_quota", code="insufficient_quota")
    assert rows(services, UsageEvent, tenant["id"]) == 0


def test_prepaid_plan_serves_exactly_what_credits_pay(client: TestClient, on_plan: Callable[[str], Tenant],
                                                      services: Services) -> None:
    tenant, headers, model = on_plan("prepaid_dime")
    grant(client, tenant["id"], amount_cents=35)  # three dimes and a nickel
    assert [classify(client, headers, model).status_code for _ in range(4)] == [200, 200, 200, 429]
    listed = credits_of(client, headers)
    assert listed["balance_cents"] == 5
    assert listed["data"][0]["remaining_cents"] == 5
    assert rows(services, UsageEvent, tenant["id"]) == 3
    with services.sessions() as session:
        query = select(func.sum(CreditDraw.amount_micro)).where(CreditDraw.tenant_id == tenant["id"])
        drawn = session.exec(query).one()
    assert drawn == 30 * 1_000_000
    # A new grant is usable at once (the credits epoch moves and the store loads it).
    grant(client, tenant["id"], amount_cents=5)
    assert classify(client, headers, model).status_code == 200
    assert credits_of(client, headers)["balance_cents"] == 0


def test_draw_order_granted_first_soonest_expiry_first(client: TestClient, on_plan: Callable[[str], Tenant],
                                                       services: Services, october: FakeClock) -> None:
    tenant, headers, model = on_plan("prepaid_dime")
    late = grant(client, tenant["id"], amount_cents=20, expires_at=october.t + 7200).json()
    never = grant(client, tenant["id"], amount_cents=20).json()
    soon = grant(client, tenant["id"], amount_cents=15, expires_at=october.t + 3600).json()
    with services.sessions() as session:  # a purchased grant pays last, whatever its expiry
        from modelmeter.billing import credits

        bought = credits.grant(session=session, tenant_id=tenant["id"], amount_cents=50, source="purchased").id
        session.commit()
    for _ in range(6):  # 60 cents: soon (15), late (20), never (20), then 5 of the purchased grant
        assert classify(client, headers, model).status_code == 200
    left = {g["id"]: g["remaining_cents"] for g in credits_of(client, headers)["data"]}
    assert left == {soon["id"]: 0, late["id"]: 0, never["id"]: 0, bought: 45}
    with services.sessions() as session:
        split = session.exec(select(CreditDraw.grant_id, CreditDraw.amount_micro)
                             .where(CreditDraw.tenant_id == tenant["id"]).order_by(col(CreditDraw.id))).all()
    # The second request takes 5 cents from `soon` and 5 from `late`: one request may draw on two grants.
    assert [(g, m // 10_000) for g, m in split][:3] == [(soon["id"], 1000), (soon["id"], 500), (late["id"], 500)]


def test_expired_credits_pay_nothing(client: TestClient, on_plan: Callable[[str], Tenant], october: FakeClock) -> None:
    tenant, headers, model = on_plan("prepaid_dime")
    grant(client, tenant["id"], amount_cents=100, expires_at=october.t + 60)
    assert classify(client, headers, model).status_code == 200
    october.advance(59)
    assert classify(client, headers, model).status_code == 200
    october.advance(1)  # expires_at is reached: the grant is spent no more
    assert_envelope(classify(client, headers, model), 429, code="insufficient_quota")
    listed = credits_of(client, headers)
    assert listed["balance_cents"] == 0
    assert (listed["data"][0]["status"], listed["data"][0]["remaining_cents"]) == ("expired", 0)


def test_credits_on_a_metered_plan_pay_first_and_the_invoice_applies_them(
        client: TestClient, on_plan: Callable[[str], Tenant], october: FakeClock) -> None:
    tenant, headers, model = on_plan("payg_dime")
    grant(client, tenant["id"], amount_cents=25)
    for _ in range(4):  # 40 cents of usage: credits pay 25, the rest is invoiced
        assert classify(client, headers, model).status_code == 200
    assert credits_of(client, headers)["balance_cents"] == 0
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    lines = [(line["code"], line["amount"]) for line in upcoming["lines"]["data"]]
    assert lines == [("base_fee", 100), ("requests", 40), ("tokens", 0), ("credits", -25)]
    assert (upcoming["subtotal"], upcoming["total"]) == (140, 115)
    credit_line = upcoming["lines"]["data"][-1]
    assert (credit_line["description"], credit_line["quantity"], credit_line["unit_amount_decimal"]) == (
        "Credits applied", 1, "-25")

    october.t = 1_793_491_200 + 86_400  # 2026-11-02: close October
    client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN)
    (invoice,) = client.get("/v1/billing/invoices", headers=headers).json()["data"]
    assert [(line["code"], line["amount"]) for line in invoice["lines"]["data"]] == lines
    assert (invoice["subtotal"], invoice["total"]) == (140, 115)


def test_credits_beyond_the_usage_never_take_an_invoice_below_its_fees(
        client: TestClient, on_plan: Callable[[str], Tenant]) -> None:
    tenant, headers, model = on_plan("payg_dime")
    grant(client, tenant["id"], amount_cents=1000)
    assert classify(client, headers, model).status_code == 200
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    assert [(line["code"], line["amount"]) for line in upcoming["lines"]["data"]] == [
        ("base_fee", 100), ("requests", 10), ("tokens", 0), ("credits", -10)]
    assert upcoming["total"] == 100
    assert credits_of(client, headers)["balance_cents"] == 990


def test_credits_that_paid_everything_leave_nothing_owed_to_rounding(
        client: TestClient, on_plan: Callable[[str], Tenant], services: Services, october: FakeClock) -> None:
    """One request and 1,000 tokens cost exactly 1 cent, drawn from credits; the two lines round to 1 cent each.
    Credits applied is then the lines' 2 cents, not the draws' 1: credits that paid everything leave 0 owed."""
    from modelmeter.billing.ledger import UsageRecord, record_usage

    tenant, headers, _ = on_plan("halves")
    grant_id = grant(client, tenant["id"], amount_cents=100).json()["id"]
    record = UsageRecord(request_id="req_halves", tenant_id=tenant["id"], model_id="m", created=october.t,
                         plan="halves", tokens=1000, credits=((grant_id, 1_000_000),))
    with services.sessions() as session:
        assert record_usage(session=session, records=[record, record]) == 1  # a repeat writes nothing twice
        session.commit()
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    assert [(line["code"], line["amount"]) for line in upcoming["lines"]["data"]] == [
        ("requests", 1), ("tokens", 1), ("credits", -2)]
    assert (upcoming["subtotal"], upcoming["total"]) == (2, 0)
    assert rows(services, CreditDraw, tenant["id"]) == 1


def test_draws_follow_the_tier_the_period_is_in(client: TestClient, on_plan: Callable[[str], Tenant],
                                                services: Services) -> None:
    """30 cents pay two requests at a dime, then two at a nickel (the marginal cost at reservation time)."""
    tenant, headers, model = on_plan("prepaid_tiers")
    grant(client, tenant["id"], amount_cents=30)
    assert [classify(client, headers, model).status_code for _ in range(5)] == [200, 200, 200, 200, 429]
    with services.sessions() as session:
        query = select(CreditDraw.amount_micro).where(CreditDraw.tenant_id == tenant["id"]).order_by(col(CreditDraw.id))
        assert list(session.exec(query).all()) == [10**7, 10**7, 5 * 10**6, 5 * 10**6]
    assert credits_of(client, headers)["balance_cents"] == 0
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    assert [line["amount"] for line in upcoming["lines"]["data"]] == [20, 10, 0, -30]
    assert upcoming["total"] == 0


def drawn_micro(services: Services, tenant_id: str) -> list[int]:
    with services.sessions() as session:
        query = select(CreditDraw.amount_micro).where(CreditDraw.tenant_id == tenant_id).order_by(col(CreditDraw.id))
        return list(session.exec(query).all())


def test_volume_tiers_draw_no_more_than_the_period_charges(client: TestClient, on_plan: Callable[[str], Tenant],
                                                           services: Services) -> None:
    """Requests 1 and 2 draw a dime each; the 3rd moves every request to the nickel tier (15 cents in all) and
    draws nothing, and so does the 4th (20 cents: what was drawn); the 5th draws a nickel. At the margin alone,
    the 4th would have drawn a nickel the period never charges."""
    tenant, headers, model = on_plan("prepaid_volume")
    grant(client, tenant["id"], amount_cents=100)
    assert [classify(client, headers, model).status_code for _ in range(5)] == [200] * 5
    assert drawn_micro(services, tenant["id"]) == [10**7, 10**7, 5 * 10**6]
    assert credits_of(client, headers)["balance_cents"] == 75
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    assert [line["amount"] for line in upcoming["lines"]["data"]] == [25, 0, -25]


def test_a_period_closed_after_a_reprice_returns_what_it_overdrew(
        client: TestClient, on_plan: Callable[[str], Tenant], services: Services, october: FakeClock) -> None:
    """Three requests drew 20 cents and the period charges 15: closing it gives the 5 back, as a grant with the
    drawn grant's source and expiry, once; the next request can spend it."""
    tenant, headers, model = on_plan("prepaid_volume")
    expires = october.t + 90 * 86_400
    grant(client, tenant["id"], amount_cents=25, expires_at=expires)
    assert [classify(client, headers, model).status_code for _ in range(3)] == [200] * 3
    assert credits_of(client, headers)["balance_cents"] == 5

    october.t = 1_793_491_200 + 86_400  # 2026-11-02: close October
    for _ in range(2):  # the second close changes nothing
        assert client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN).status_code == 200
    (invoice,) = client.get("/v1/billing/invoices", headers=headers).json()["data"]
    assert [(line["code"], line["amount"]) for line in invoice["lines"]["data"]] == [
        ("requests", 15), ("tokens", 0), ("credits", -15)]
    assert invoice["total"] == 0
    grants = credits_of(client, headers)
    assert grants["balance_cents"] == 10
    back = grants["data"][0]
    assert (back["amount_cents"], back["remaining_cents"], back["source"], back["expires_at"]) == (
        5, 5, "granted", expires)
    assert "Returned from 2026-10" in back["description"]
    assert classify(client, headers, model).status_code == 200  # November's first request: a dime, 5 of it back
    assert classify(client, headers, model).status_code == 429


@pytest.mark.anyio
async def test_expired_draws_are_settled_by_the_ledger(client: TestClient, on_plan: Callable[[str], Tenant],
                                                       services: Services, october: FakeClock) -> None:
    """Two requests drew credits and their replica died before settling: the one whose usage row was committed
    keeps its draw, the one never served gets it back. The ledger decides, not the lapse of the hold."""
    from modelmeter.billing.credits import store_grants
    from modelmeter.billing.ledger import UsageRecord, record_usage
    from modelmeter.billing.meter import Meter
    from modelmeter.billing.quota import Amount, InProcessQuotaStore

    tenant, _, _ = on_plan("prepaid_dime")
    grant(client, tenant["id"], amount_cents=30)
    ticks = [0.0]
    store = InProcessQuotaStore(hold_ttl_s=60, clock=lambda: ticks[0])
    meter = Meter(sessions=services.sessions, ledger=services.ledger, quota=store,
                  grants=lambda tenant_id, now: store_grants(sessions=services.sessions, tenant_id=tenant_id, now=now))
    plan = services.plans.get("prepaid_dime")
    holds = [await meter.reserve(tenant_id=tenant["id"], plan=plan, budget_cents=None, amount=Amount(requests=1),
                                 at=october.t, credits_epoch=1, request_id=rid) for rid in ("req_served", "req_lost")]
    with services.sessions() as session:  # the first request's row and draw made it to the ledger
        record_usage(session=session, records=[UsageRecord(request_id="req_served", tenant_id=tenant["id"],
                                                           model_id="m", created=october.t, plan="prepaid_dime",
                                                           credits=holds[0].draws)])
        session.commit()
    ticks[0] += 61  # both holds lapse; the next reservation reaps them
    third = await meter.reserve(tenant_id=tenant["id"], plan=plan, budget_cents=None, amount=Amount(requests=1),
                                at=october.t, credits_epoch=1, request_id="req_third")
    assert third.draws
    assert await store.credit_balances(tenant["id"]) == {holds[0].draws[0][0]: 0}  # parked: not drawn twice
    assert await meter.resolve_expired(tenant["id"]) == 2
    assert await store.credit_balances(tenant["id"]) == {holds[0].draws[0][0]: 10 * 1_000_000}  # req_lost's dime
    await meter.aclose()


@pytest.mark.skipif(not REDIS_URL, reason="replicas share limits and invalidations through Redis")
def test_credits_granted_on_one_replica_serve_on_another_within_a_second(
        client: TestClient, settings: Settings, on_plan: Callable[[str], Tenant]) -> None:
    """Before (issue 21): another replica kept the tenant's cached credits epoch for the key TTL (30 s) and answered
    429 meanwhile. Now the grant is published and every replica forgets its cached keys at once."""
    import time

    from modelmeter.gateway.app import create_app

    tenant, headers, model = on_plan("prepaid_dime")
    with TestClient(create_app(settings)) as other:
        other_services = services_of(other.app)
        deadline = time.monotonic() + 10
        while not other_services.invalidations.subscribed.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_envelope(classify(other, headers, model), 429, code="insufficient_quota")  # cached on `other`
        grant(client, tenant["id"], amount_cents=20)  # through the first replica
        served_at = None
        started = time.monotonic()
        while time.monotonic() - started < 5:
            if classify(other, headers, model).status_code == 200:
                served_at = time.monotonic() - started
                break
            time.sleep(0.05)
        assert served_at is not None, "the other replica never saw the new credits"
        assert served_at < 1.0
