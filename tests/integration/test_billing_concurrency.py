"""Limits, quotas, budgets and prepaid credits under concurrent requests (in-process, or Redis when configured),
and two gateway processes sharing PostgreSQL and Redis enforcing one tenant's limit and credits jointly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import func, select

from modelmeter.billing.tables import CreditDraw, UsageEvent
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import services_of
from modelmeter.settings import Settings
from tests.conftest import ADMIN, ON_POSTGRES, REDIS_URL, bearer
from tests.support.gateways import running_gateways, warm_then_burst
from tests.support.plans import with_plans
from tests.support.tenants import tenant_with_model

TEST_PLANS = [
    {"id": "quota10", "name": "Ten requests", "base_fee_cents": 0, "included_tokens": 100000,
     "included_requests": 10, "rpm_limit": 10000, "tpm_limit": 10000000, "hard_limit": True},
    {"id": "metered", "name": "Metered", "base_fee_cents": 0, "price_per_request": "0.0005",
     "price_per_1k_tokens": "0.0200", "rpm_limit": 10000, "tpm_limit": 10000000},
    {"id": "prepaid_dime", "name": "Prepaid, a dime a request", "price_per_request": "0.10", "rpm_limit": 100000,
     "tpm_limit": 100000000, "prepaid": True},
]


@pytest.fixture
def plans_settings(settings: Settings, tmp_path: Path) -> Settings:
    return with_plans(settings, tmp_path, TEST_PLANS)


def _ledger_count(client: TestClient, tenant_id: str) -> int:
    with services_of(client.app).sessions() as session:
        return len(session.exec(select(UsageEvent).where(UsageEvent.tenant_id == tenant_id)).all())


def _credits(client: TestClient, tenant_id: str) -> tuple[int, int]:
    """(balance in cents per the API, micro-cents drawn per the ledger)."""
    balance = client.get(f"/admin/tenants/{tenant_id}/credits", headers=ADMIN).json()["balance_cents"]
    with services_of(client.app).sessions() as session:
        drawn = session.exec(select(func.sum(CreditDraw.amount_micro)).where(CreditDraw.tenant_id == tenant_id)).one()
    return balance, int(drawn or 0)


async def _burst(settings: Settings, model: str, key: str, n: int = 64) -> list[httpx.Response]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return list(await asyncio.gather(*(
                http.post("/v1/classify", json={"model": model, "input": "x"}, headers=bearer(key)) for _ in range(n)
            )))


@pytest.mark.anyio
async def test_hard_limit_admits_exactly_the_quota(plans_settings: Settings) -> None:
    client, tenant_id, key, model = tenant_with_model(plans_settings, "quota10")
    try:
        responses = await _burst(plans_settings, model, key)
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) == 10
        assert codes.count(429) == 54
        refused = next(r for r in responses if r.status_code == 429).json()["error"]
        assert refused["type"] == "insufficient_quota"
        assert refused["code"] == "insufficient_quota"
        assert _ledger_count(client, tenant_id) == 10
    finally:
        client.__exit__(None, None, None)


@pytest.mark.anyio
async def test_budget_is_never_overspent(plans_settings: Settings) -> None:
    # Each request: "x" is 3 tokens → 0.05 + 3 * 0.002 = 0.056 cents; a 1-cent budget admits 17 of them.
    client, tenant_id, key, model = tenant_with_model(plans_settings, "metered", monthly_budget_cents=1)
    try:
        responses = await _burst(plans_settings, model, key)
        assert [r.status_code for r in responses].count(200) == 17
        sub = client.get("/v1/billing/subscription", headers=bearer(key)).json()
        assert sub["budget"]["spent_cents_decimal"] == "0.952"  # 17 * 0.056, never past 1 cent
        assert _ledger_count(client, tenant_id) == 17
    finally:
        client.__exit__(None, None, None)


@pytest.mark.anyio
async def test_prepaid_credits_are_never_overdrawn(plans_settings: Settings) -> None:
    """$5.00 of credits, 100 concurrent requests at $0.10: exactly 50 served, 50 refused, nothing left, nothing
    drawn twice (the draw is part of the atomic reservation)."""
    client, tenant_id, key, model = tenant_with_model(plans_settings, "prepaid_dime")
    try:
        granted = client.post(f"/admin/tenants/{tenant_id}/credits", json={"amount_cents": 500}, headers=ADMIN)
        assert granted.status_code == 201, granted.text
        responses = await _burst(plans_settings, model, key, n=100)
        codes = [r.status_code for r in responses]
        assert (codes.count(200), codes.count(429)) == (50, 50)
        assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"insufficient_quota"}
        assert _ledger_count(client, tenant_id) == 50
        assert _credits(client, tenant_id) == (0, 500 * 1_000_000)
    finally:
        client.__exit__(None, None, None)


@pytest.mark.anyio
async def test_rpm_limit_under_concurrency(plans_settings: Settings) -> None:
    client, tenant_id, key, model = tenant_with_model(plans_settings, "metered", rpm_limit=5)
    try:
        responses = await _burst(plans_settings, model, key)
        ok = [r for r in responses if r.status_code == 200]
        limited = [r for r in responses if r.status_code == 429]
        assert len(ok) == 5
        assert len(limited) == 59
        assert limited[0].json()["error"]["type"] == "rate_limit_exceeded"
        assert int(limited[0].headers["retry-after"]) >= 1
        assert ok[0].headers["x-ratelimit-limit-requests"] == "5"
        assert "ratelimit-policy" in ok[0].headers
        assert "ratelimit" in ok[0].headers
        assert _ledger_count(client, tenant_id) == 5
    finally:
        client.__exit__(None, None, None)



# --- two gateway processes ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.skipif(not (ON_POSTGRES and REDIS_URL), reason="needs PostgreSQL and Redis (CI sets both)")
async def test_two_gateways_share_one_limit(plans_settings: Settings) -> None:
    client, tenant_id, key, model = tenant_with_model(plans_settings, "quota10", rpm_limit=1000)
    try:
        with running_gateways(plans_settings) as urls:
            responses = await warm_then_burst(urls, model, key, 40)  # after one request each, to load the model
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 8
        assert codes.count(429) == 32
        assert _ledger_count(client, tenant_id) == 10
    finally:
        client.__exit__(None, None, None)


@pytest.mark.anyio
@pytest.mark.skipif(not (ON_POSTGRES and REDIS_URL), reason="needs PostgreSQL and Redis (CI sets both)")
async def test_two_gateways_never_overdraw_credits(plans_settings: Settings) -> None:
    client, tenant_id, key, model = tenant_with_model(plans_settings, "prepaid_dime")
    try:
        client.post(f"/admin/tenants/{tenant_id}/credits", json={"amount_cents": 500}, headers=ADMIN)
        with running_gateways(plans_settings) as urls:
            responses = await warm_then_burst(urls, model, key, 100)  # after one request each, to load the model
        codes = [r.status_code for r in responses]
        assert (codes.count(200), codes.count(429)) == (48, 52)
        assert _ledger_count(client, tenant_id) == 50
        assert _credits(client, tenant_id) == (0, 500 * 1_000_000)
    finally:
        client.__exit__(None, None, None)
