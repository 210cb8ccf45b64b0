"""Tiered plans through the API: the catalog shows the tiers, invoices have a line per tier reached, budgets follow
the tier the period's usage is in, usage buckets and the dashboard price through the tiers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from modelmeter.billing.ledger import UsageRecord, record_usage
from modelmeter.gateway.services import Services
from modelmeter.settings import Settings
from tests.conftest import ADMIN, FakeClock, assert_envelope, bearer
from tests.support.plans import with_plans

PACKAGED = Path(__file__).parents[2] / "src/modelmeter/billing/plans.json"
TEST_PLANS = [
    {"id": "steps", "name": "Steps", "price_per_1k_tokens": "0", "rpm_limit": 10_000, "tpm_limit": 10**7,
     "request_tiers": {"tiers_mode": "graduated", "tiers": [
         {"up_to": 2, "unit_amount_decimal": "1.00"}, {"up_to": None, "unit_amount_decimal": "0.25"}]}},
    {"id": "bulk", "name": "Bulk", "price_per_1k_tokens": "0", "rpm_limit": 10_000, "tpm_limit": 10**7,
     "request_tiers": {"tiers_mode": "volume", "tiers": [
         {"up_to": 2, "unit_amount_decimal": "1.00"},
         {"up_to": None, "unit_amount_decimal": "0.10", "flat_amount_cents": 5}]}},
]


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The packaged catalog plus two small tiered plans."""
    return with_plans(settings, tmp_path, TEST_PLANS)


@pytest.fixture
def october(fake_clock: FakeClock) -> FakeClock:
    fake_clock.t = ts(2026, 10, 20)
    return fake_clock


def record(services: Services, tenant: dict[str, Any], plan: str, created: int, **counts: int) -> None:
    with services.sessions() as session:
        record_usage(session=session, records=[UsageRecord(
            request_id=f"r{created}-{sorted(counts.items())}", tenant_id=tenant["id"], model_id="m", created=created,
            plan=plan, **counts)])
        session.commit()


def lines_of(invoice: dict[str, Any]) -> list[tuple[str, str, int, str, int]]:
    return [(x["code"], x["description"], x["quantity"], x["unit_amount_decimal"], x["amount"])
            for x in invoice["lines"]["data"]]


def test_admin_plans_show_scale_tiers(client: TestClient) -> None:
    scale = next(p for p in client.get("/admin/plans", headers=ADMIN).json()["data"] if p["id"] == "scale")
    assert "price_per_1k_tokens" not in scale
    assert "request_tiers" not in scale
    assert scale["token_tiers"] == {"tiers_mode": "graduated", "tiers": [
        {"up_to": 100_000_000, "unit_amount_decimal": "0.0080", "flat_amount_cents": 0},
        {"up_to": 1_000_000_000, "unit_amount_decimal": "0.0050", "flat_amount_cents": 0},
        {"up_to": None, "unit_amount_decimal": "0.0030", "flat_amount_cents": 0}]}
    assert (scale["base_fee_cents"], scale["included_tokens"], scale["price_per_request"]) == (49_900, 10**7, "0.0000")


def test_scale_upcoming_invoice_has_a_line_per_tier(client: TestClient, make_tenant: Any, make_key: Any,
                                                    services: Services, october: FakeClock) -> None:
    tenant = make_tenant(plan="scale")
    headers = bearer(make_key(tenant["id"])["key"])
    client.patch(f"/admin/tenants/{tenant['id']}", json={"monthly_budget_cents": 500_000}, headers=ADMIN)
    record(services, tenant, "scale", ts(2026, 10, 2), requests=60_000, tokens=150_000_000)
    record(services, tenant, "scale", ts(2026, 10, 9), requests=30_000, tokens=100_000_000)
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    base = lines_of(upcoming)[0]
    assert base[0] == "base_fee"
    assert lines_of(upcoming)[1:] == [
        ("requests", "Requests: 90,000 used", 90_000, "0", 0),
        ("tokens", "Tokens 1\u2013100,000,000 (tier 1 of 3, graduated): 250,000,000 used, 10,000,000 included",
         100_000_000, "0.0008", 80_000),
        ("tokens", "Tokens 100,000,001\u20131,000,000,000 (tier 2 of 3, graduated): 250,000,000 used, "
         "10,000,000 included", 140_000_000, "0.0005", 70_000),
    ]
    assert upcoming["total"] == base[4] + 150_000
    subscription = client.get("/v1/billing/subscription", headers=headers).json()
    assert subscription["plan"]["token_tiers"]["tiers_mode"] == "graduated"
    assert "price_per_1k_tokens" not in subscription["plan"]
    assert subscription["budget"]["spent_cents"] == 150_000
    assert subscription["budget"]["remaining_cents"] == 350_000


def test_budget_follows_the_tier(client: TestClient, make_tenant: Any, make_key: Any, register_model: Any,
                                 october: FakeClock) -> None:
    """Graduated: two requests at $1.00, then $0.25: a $2.50 budget serves four (a flat $1.00 would serve two)."""
    tenant = make_tenant(plan="steps")
    client.patch(f"/admin/tenants/{tenant['id']}", json={"monthly_budget_cents": 250}, headers=ADMIN)
    headers = bearer(make_key(tenant["id"])["key"])
    model = register_model(tenant["id"])
    statuses = [client.post("/v1/classify", json={"model": model, "input": "fine"}, headers=headers).status_code
                for _ in range(4)]
    assert statuses == [200] * 4
    assert_envelope(client.post("/v1/classify", json={"model": model, "input": "fine"}, headers=headers), 429,
                    code="insufficient_quota")
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    assert [line for line in lines_of(upcoming) if line[0] == "requests"] == [
        ("requests", "Requests 1\u20132 (tier 1 of 2, graduated): 4 used", 2, "100", 200),
        ("requests", "Requests 3 and above (tier 2 of 2, graduated): 4 used", 2, "25", 50),
    ]
    assert upcoming["total"] == 250


def test_volume_usage_buckets_can_be_negative_and_sum_to_the_invoice(client: TestClient, make_tenant: Any,
                                                                     make_key: Any, services: Services,
                                                                     october: FakeClock) -> None:
    """Volume: two requests cost 2 x $1.00; the third moves all three to $0.10 (+5¢ flat): that day costs less than
    nothing, and the buckets still add up to the invoice."""
    tenant = make_tenant(plan="bulk")
    headers = bearer(make_key(tenant["id"])["key"])
    record(services, tenant, "bulk", ts(2026, 10, 3, 12), requests=2)
    record(services, tenant, "bulk", ts(2026, 10, 9, 12), requests=1)
    usage = client.get(f"/v1/usage?start_time={ts(2026, 10, 1)}&end_time={ts(2026, 11, 1)}&bucket_width=1d",
                       headers=headers).json()
    costs = [(b["start_time"], r["cost_cents"], r["cost_cents_decimal"]) for b in usage["data"] for r in b["results"]]
    assert costs == [(ts(2026, 10, 3), 200, "200"), (ts(2026, 10, 9), -165, "-165")]
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=headers).json()
    assert lines_of(upcoming) == [
        ("requests", "Requests 3 and above (tier 2 of 2, volume): 3 used", 3, "10", 30),
        ("requests", "Requests 3 and above (tier 2 of 2, volume): flat fee", 1, "5", 5),
    ]
    assert upcoming["total"] == 35 == sum(cost for _, cost, _ in costs)


def test_dashboard_shows_the_tiers(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    tenant = make_tenant(name="Tiered Co", plan="scale")
    headers = bearer(make_key(tenant["id"], scopes=["billing:read"])["key"])
    link = client.post("/v1/dashboard/links", headers=headers).json()["url"]
    page = client.get(link.removeprefix("http://testserver"))
    assert page.status_code == 200
    assert ("graduated: 1\u2013100,000,000 at 0.8¢; 100,000,001\u20131,000,000,000 at 0.5¢; "
            "1,000,000,001 and above at 0.3¢ (bounds count billable tokens of the month)") in page.text
