"""Unit economics through the admin API, the CLI and the metrics: revenue from invoices (or the preview while a
period is open) against the ledger's compute time priced per core-hour or GPU-hour, in exact cents; credit-funded
revenue counted once, at use (purchased credits' usage is revenue, granted credits' usage a discount)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from modelmeter.billing import credits
from modelmeter.billing.ledger import UsageRecord, record_usage
from modelmeter.cli import main
from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import services_of
from modelmeter.money import MICRO_PER_CENT
from modelmeter.settings import Settings
from tests.conftest import ADMIN, ADMIN_TOKEN, FakeClock, assert_envelope, bearer
from tests.support.credits import grant_credits
from tests.support.ledger import add_usage

HOUR_US = 3_600_000_000
CORES = os.cpu_count() or 1  # the test settings leave torch_threads at 0: one thread per core


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


def usage(client: TestClient, tenant_id: str, plan: str, at: int, n: int, **fields: Any) -> None:
    add_usage(services_of(client.app), tenant_id, plan, at, f"r_{tenant_id}_{at}_{n}", **fields)


@pytest.fixture
def october(client: TestClient, make_tenant: Any, fake_clock: FakeClock) -> dict[str, str]:
    """payg: 1000 requests and 100k tokens on one CPU-hour; pro: 0.5 GPU-hour within its allowance."""
    fake_clock.t = ts(2026, 10, 1)
    payg, pro = make_tenant(plan="payg")["id"], make_tenant(plan="pro")["id"]
    usage(client, payg, "payg", ts(2026, 10, 10), 1, requests=1000, tokens=100_000, compute_us=HOUR_US)
    usage(client, pro, "pro", ts(2026, 10, 11), 2, requests=10, tokens=2000, compute_us=HOUR_US // 2,
          device="cuda")
    return {"payg": payg, "pro": pro}


def economics(client: TestClient, **params: str) -> list[dict[str, Any]]:
    response = client.get("/admin/economics", params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["has_more"] is False
    return list(body["data"])


def test_open_period_uses_the_preview_and_exact_costs(client: TestClient, october: dict[str, str],
                                                     fake_clock: FakeClock) -> None:
    fake_clock.t = ts(2026, 10, 20)
    rows = {r["tenant_id"]: r for r in economics(client)}
    payg, pro = rows[october["payg"]], rows[october["pro"]]
    # payg: 1000 x $0.0005 + 100 x $0.02 = 50 + 200 cents; one CPU-hour on CORES cores at 5 cents per core-hour.
    assert (payg["period"], payg["revenue_cents"], payg["revenue_source"]) == ("2026-10", 250, "preview")
    assert payg["compute_cost_cents"] == 5 * CORES
    assert payg["margin_cents"] == 250 - 5 * CORES
    assert (payg["cpu_compute_ms"], payg["gpu_compute_ms"], payg["plans"]) == (3_600_000, 0, ["payg"])
    # pro: the $49 base fee, tokens within the allowance; half a GPU-hour at $2.50.
    assert (pro["revenue_cents"], pro["compute_cost_cents"], pro["margin_cents"]) == (4900, 125, 4775)
    assert pro["compute_cost_cents_decimal"] == "125.000000"
    assert pro["margin_ratio"] == "0.9745"


def test_closed_period_uses_invoices_and_splits_by_plan(client: TestClient, october: dict[str, str],
                                                        fake_clock: FakeClock) -> None:
    fake_clock.t = ts(2026, 10, 16)
    client.patch(f"/admin/tenants/{october['payg']}", json={"plan": "pro"}, headers=ADMIN)
    usage(client, october["payg"], "pro", ts(2026, 10, 20), 3, requests=5, tokens=1000, compute_us=1_000_000)
    fake_clock.t = ts(2026, 11, 2)
    client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN)
    invoices = [client.get("/v1/billing/invoices", headers=bearer(key)).json()["data"][0]
                for key in (_key(client, october["payg"]), _key(client, october["pro"]))]

    by_tenant = {r["tenant_id"]: r for r in economics(client, period="2026-10")}
    switched = by_tenant[october["payg"]]
    assert switched["revenue_source"] == "invoice"
    assert switched["plans"] == ["payg", "pro"]
    assert switched["revenue_cents"] == invoices[0]["total"]
    by_plan = {r["plan"]: r for r in economics(client, period="2026-10", group_by="plan")}
    assert sum(r["revenue_cents"] for r in by_plan.values()) == sum(i["total"] for i in invoices)
    payg_lines = [x for x in invoices[0]["lines"]["data"] if x["plan"] == "payg"]
    assert by_plan["payg"]["revenue_cents"] == sum(x["amount"] for x in payg_lines) == 250
    assert by_plan["pro"]["tokens"] == 2000 + 1000
    assert by_plan["pro"]["requests"] == 15
    assert by_plan["payg"]["compute_cost_cents"] == 5 * CORES


def _key(client: TestClient, tenant_id: str) -> str:
    response = client.post(f"/admin/tenants/{tenant_id}/keys", json={}, headers=ADMIN)
    return str(response.json()["key"])


def test_refusals(client: TestClient, make_tenant: Any, make_key: Any) -> None:
    for period in ("2026-13", "26-10", "october", "0000-01"):
        error = assert_envelope(client.get("/admin/economics", params={"period": period}, headers=ADMIN), 422)
        assert error["param"] == "period"
    assert_envelope(client.get("/admin/economics", params={"period": "2199-01"}, headers=ADMIN), 409,
                    code="period_in_future")
    assert_envelope(client.get("/admin/economics", params={"group_by": "key"}, headers=ADMIN), 422)
    tenant_key = bearer(make_key(make_tenant()["id"])["key"])
    assert_envelope(client.get("/admin/economics", headers=tenant_key), 403)


def test_metrics_match_the_api(client: TestClient, settings: Settings, october: dict[str, str],
                               fake_clock: FakeClock) -> None:
    fake_clock.t = ts(2026, 10, 20)
    registry = CollectorRegistry()
    with TestClient(create_app(settings, registry=registry)):
        value = registry.get_sample_value
        for row in economics(client, group_by="plan"):
            labels = {"plan": row["plan"]}
            assert value("modelmeter_plan_revenue_cents", labels) == row["revenue_cents"]
            assert value("modelmeter_plan_compute_cost_cents", labels) == row["compute_cost_cents"]
            assert value("modelmeter_plan_margin_cents", labels) == row["margin_cents"]
        for row in economics(client):
            assert value("modelmeter_tenant_revenue_cents", {"tenant": row["tenant_id"]}) == row["revenue_cents"]
        assert value("modelmeter_tenants", {"plan": "pro", "status": "active"}) == 1


def test_cli(client: TestClient, settings: Settings, october: dict[str, str], fake_clock: FakeClock,
             monkeypatch: pytest.MonkeyPatch) -> None:
    fake_clock.t = ts(2026, 10, 20)
    for name, value in (("DATA_DIR", str(settings.data_dir)), ("DATABASE_URL", settings.database_url or ""),
                        ("ADMIN_TOKEN", ADMIN_TOKEN)):
        monkeypatch.setenv(f"MODELMETER_{name}", value)
    result = CliRunner().invoke(main, ["economics", "--period", "2026-10", "--group-by", "plan", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"] == economics(client, period="2026-10", group_by="plan")
    human = CliRunner().invoke(main, ["economics"])
    assert human.exit_code == 0
    assert october["pro"] in human.output
    assert "(all)" in human.output
    assert "revenue=      $49.00" in human.output
    bad = CliRunner().invoke(main, ["economics", "--period", "2026-1"])
    assert bad.exit_code == 1
    assert "YYYY-MM" in bad.output


# --- prepaid credits: revenue counted once, at use ----------------------------------------------------------


def test_granted_share_splits_exactly() -> None:
    m = MICRO_PER_CENT
    assert credits.granted_share(250, {"granted": 250 * m}) == 250
    assert credits.granted_share(250, {"purchased": 250 * m}) == 0
    assert credits.granted_share(250, {"granted": 100 * m, "purchased": 150 * m}) == 100
    assert credits.granted_share(250, {"granted": 200 * m, "purchased": 100 * m}) == 167  # 166.67, half-up
    assert credits.granted_share(3, {"granted": 1, "purchased": 1}) == 2  # 1.5, half-up; purchased gets 1
    assert credits.granted_share(0, {"granted": 5 * m}) == 0
    assert credits.granted_share(7, {}) == 0


def test_credit_funded_revenue_counts_once_at_use(client: TestClient, make_tenant: Any,
                                                 fake_clock: FakeClock) -> None:
    fake_clock.t = ts(2026, 10, 1)
    gifted, bought, mixed, capped, topped_up = (make_tenant(plan=p)["id"]
                                                for p in ("payg", "payg", "payg", "payg", "pro"))
    paid_by: dict[str, tuple[tuple[str, int], ...]] = {
        # payg: 1000 requests and 100k tokens are 250 cents of charges, each paid by credits.
        gifted: ((grant_credits(services_of(client.app), gifted, 500, "granted"), 250 * MICRO_PER_CENT),),
        bought: ((grant_credits(services_of(client.app), bought, 500, "purchased"), 250 * MICRO_PER_CENT),),
        mixed: ((grant_credits(services_of(client.app), mixed, 100, "granted"), 100 * MICRO_PER_CENT),
                (grant_credits(services_of(client.app), mixed, 500, "purchased"), 150 * MICRO_PER_CENT)),
        # Draws worth more than the charges (300 cents against 250): the invoice applies 250, two thirds granted.
        capped: ((grant_credits(services_of(client.app), capped, 200, "granted"), 200 * MICRO_PER_CENT),
                 (grant_credits(services_of(client.app), capped, 500, "purchased"), 100 * MICRO_PER_CENT)),
    }
    grant_credits(services_of(client.app), topped_up, 10_000, "purchased")  # a $100 top-up, none of it used
    services = services_of(client.app)
    with services.sessions() as session:
        record_usage(session=session, records=[
            UsageRecord(request_id=f"r_{tenant}", tenant_id=tenant, model_id="m", created=ts(2026, 10, 10),
                        plan="payg", requests=1000, tokens=100_000, compute_us=0, credits=draws)
            for tenant, draws in paid_by.items()])
        session.commit()
    # charges - the granted part of 'Credits applied'; a purchase alone is deferred, not revenue.
    expected = {gifted: 250 - 250, bought: 250, mixed: 250 - 100, capped: 250 - 167, topped_up: 4900}

    fake_clock.t = ts(2026, 10, 20)
    preview = {r["tenant_id"]: r for r in economics(client)}
    assert {t: preview[t]["revenue_cents"] for t in expected} == expected
    assert {preview[t]["revenue_source"] for t in expected} == {"preview"}

    fake_clock.t = ts(2026, 11, 2)
    assert client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN).status_code == 200
    closed = {r["tenant_id"]: r for r in economics(client, period="2026-10")}
    assert {t: closed[t]["revenue_cents"] for t in expected} == expected
    assert {closed[t]["revenue_source"] for t in expected} == {"invoice"}
    # Every credit-funded invoice came to zero: the tenants paid with credits, never twice.
    totals = {t: client.get("/v1/billing/invoices", headers=bearer(_key(client, t))).json()["data"][0]["total"]
              for t in expected}
    assert totals == {gifted: 0, bought: 0, mixed: 0, capped: 0, topped_up: 4900}
    by_plan = {r["plan"]: r["revenue_cents"] for r in economics(client, period="2026-10", group_by="plan")}
    assert by_plan == {"payg": 0 + 250 + 150 + 83, "pro": 4900}
