"""Plan simulation through the admin API and the CLI, on a controlled clock: with nothing changed it reproduces
every closed invoice to the cent (a mid-period plan change, tiers, granted and purchased credits present); a
candidate plan's revenue matches a recomputation written here from the plan's JSON and ``/v1/usage``; it writes
no row; bad input is refused naming the field. Runs on SQLite, and on PostgreSQL when MODELMETER_DATABASE_URL
points there."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlmodel import select

from modelmeter.billing.simulation import simulate
from modelmeter.billing.tables import Invoice
from modelmeter.cli import main
from modelmeter.gateway.services import Services
from modelmeter.money import MICRO_PER_CENT
from tests.conftest import ADMIN, ADMIN_TOKEN, FakeClock, assert_envelope, bearer
from tests.support.credits import grant_credits
from tests.support.ledger import add_usage

HOUR_US = 3_600_000_000
OCT, NOV = 1_790_812_800, 1_793_491_200  # 2026-10-01, 2026-11-01 (UTC)


def ts(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp())


def half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def usage(services: Services, tenant_id: str, plan: str, at: int, **fields: Any) -> None:
    add_usage(services, tenant_id, plan, at, f"r_{tenant_id}_{at}", **fields)


@pytest.fixture
def october(client: TestClient, services: Services, make_tenant: Any, fake_clock: FakeClock) -> dict[str, str]:
    """October 2026: a payg tenant moving to pro on the 16th, a payg tenant paid partly by granted credits, one
    by purchased credits, a tiered scale tenant, a pro tenant near its allowance, and a pro tenant from the 15th."""
    fake_clock.t = OCT
    t = {name: make_tenant(plan=plan)["id"] for name, plan in (
        ("switch", "payg"), ("gifted", "payg"), ("bought", "payg"), ("scale", "scale"), ("pro", "pro"))}
    usage(services, t["switch"], "payg", ts(2026, 10, 10), requests=1000, tokens=100_000, compute_us=HOUR_US)
    gifted = grant_credits(services, t["gifted"], 300, "granted")
    usage(services, t["gifted"], "payg", ts(2026, 10, 12), requests=500, tokens=50_000, compute_us=HOUR_US // 4,
          credits=((gifted, 100 * MICRO_PER_CENT),))
    bought = grant_credits(services, t["bought"], 500, "purchased")
    usage(services, t["bought"], "payg", ts(2026, 10, 12), requests=200, tokens=10_000,
          credits=((bought, 30 * MICRO_PER_CENT),))
    usage(services, t["scale"], "scale", ts(2026, 10, 13), requests=10, tokens=20_000_123,
          compute_us=HOUR_US // 2, device="cuda")
    usage(services, t["pro"], "pro", ts(2026, 10, 14), requests=10, tokens=4_500_000, compute_us=HOUR_US // 3)
    fake_clock.t = ts(2026, 10, 15)
    t["late"] = make_tenant(plan="pro")["id"]
    usage(services, t["late"], "pro", ts(2026, 10, 15, 12), requests=3, tokens=100)
    fake_clock.t = ts(2026, 10, 16)
    assert client.patch(f"/admin/tenants/{t['switch']}", json={"plan": "pro"}, headers=ADMIN).status_code == 200
    usage(services, t["switch"], "pro", ts(2026, 10, 20), requests=5, tokens=1000, compute_us=1_000_000)
    fake_clock.t = ts(2026, 10, 25)
    return t


def sim(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/admin/billing/simulate", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    result = dict(response.json())
    assert (result["object"], result["period"]) == ("simulation", body["period"])
    return result


def by_tenant(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["tenant_id"]: row for row in result["data"]}


def close_october(client: TestClient, fake_clock: FakeClock) -> None:
    fake_clock.t = ts(2026, 11, 2)
    assert client.post("/admin/billing/close", json={"period": "2026-10"}, headers=ADMIN).status_code == 200


def test_nothing_changed_reproduces_every_closed_invoice_to_the_cent(
        client: TestClient, services: Services, october: dict[str, str], fake_clock: FakeClock) -> None:
    close_october(client, fake_clock)
    with services.sessions() as session:
        invoices = {i.tenant_id: i for i in session.exec(select(Invoice).where(Invoice.period == "2026-10"))}
    assert set(invoices) == set(october.values())
    # The service's own view: the invoice each tenant would get is the one it got, line rounding included.
    result = simulate(sessions=services.sessions, catalog=services.plans, settings=services.settings,
                      period="2026-10")
    assert {r.tenant_id: r.invoice_total_simulated for r in result.rows} == {
        tid: i.total for tid, i in invoices.items()}
    assert invoices[october["gifted"]].total == 125 - 100  # credits applied on the invoice
    body = sim(client, period="2026-10")
    rows = by_tenant(body)
    economics = {r["tenant_id"]: r for r in client.get("/admin/economics", params={"period": "2026-10"},
                                                       headers=ADMIN).json()["data"]}
    for tenant_id, row in rows.items():
        assert row["revenue_simulated_cents"] == row["revenue_actual_cents"] == economics[tenant_id]["revenue_cents"]
        assert row["margin_simulated_cents"] == row["margin_actual_cents"] == economics[tenant_id]["margin_cents"]
        assert row["compute_cost_cents"] == economics[tenant_id]["compute_cost_cents"]
        assert row["plan_simulated"] == row["plan_actual"]
    # Revenue as economics counts it: granted credits' usage is a discount, purchased credits' usage is revenue.
    assert rows[october["gifted"]]["revenue_actual_cents"] == invoices[october["gifted"]].total == 25
    assert rows[october["bought"]]["revenue_actual_cents"] == invoices[october["bought"]].subtotal == 10 + 20
    assert rows[october["switch"]]["plan_actual"] == "payg+pro"
    assert body["totals"] == {k: sum(r[k] for r in body["data"]) for k in body["totals"]}


# --- an independent recomputation ----------------------------------------------------------------------------


def dimension_cents(plan: dict[str, Any], used: int, included: str, flat: str, tiers: str, per: int) -> int:
    """A metered dimension: the units beyond the allowance at the flat price, or through graduated tiers, each
    tier reached (and its flat amount) a line rounded half-up once; a used dimension reaches the first tier even
    within its allowance (README "Tiered prices"); an unused one costs nothing."""
    if not used:
        return 0
    billable = max(0, used - plan[included])
    if tiers not in plan:
        return half_up(Decimal(billable) * Decimal(plan[flat]) * 100 / per)
    assert plan[tiers]["tiers_mode"] == "graduated"
    cents, below = 0, 0
    for i, tier in enumerate(plan[tiers]["tiers"]):
        top = billable if tier["up_to"] is None else min(billable, tier["up_to"])
        if i and top <= below:
            break
        cents += half_up(Decimal(top - below) * Decimal(tier["unit_amount_decimal"]) * 100 / per)
        cents += tier.get("flat_amount_cents", 0)
        below = top
    return cents


def recompute(plan: dict[str, Any], quantities: dict[str, int], held_s: int) -> int:
    seconds = NOV - OCT
    base = half_up(Decimal(plan["base_fee_cents"]) * held_s / seconds)
    return (base
            + dimension_cents(plan, quantities["requests"], "included_requests", "price_per_request",
                              "request_tiers", 1)
            + dimension_cents(plan, quantities["tokens"], "included_tokens", "price_per_1k_tokens", "token_tiers",
                              1000)
            + dimension_cents(plan, quantities["training_tokens"], "included_training_tokens",
                              "price_per_1m_training_tokens", "training_tiers", 1_000_000))


def usage_by_plan(client: TestClient, tenant_id: str) -> dict[str, dict[str, int]]:
    """``/v1/usage`` for October, per plan, as the tenant sees it."""
    key = client.post(f"/admin/tenants/{tenant_id}/keys", json={}, headers=ADMIN).json()["key"]
    response = client.get("/v1/usage", params={"start_time": OCT, "end_time": NOV, "group_by": "plan"},
                          headers=bearer(key))
    assert response.status_code == 200, response.text
    out: dict[str, dict[str, int]] = {}
    for bucket in response.json()["data"]:
        for result in bucket["results"]:
            q = out.setdefault(result["plan"], {"requests": 0, "tokens": 0, "training_tokens": 0})
            for name in q:
                q[name] += result[name]
    return out


def total(quantities: dict[str, dict[str, int]]) -> dict[str, int]:
    return {name: sum(q[name] for q in quantities.values()) for name in ("requests", "tokens", "training_tokens")}


def test_a_candidate_plan_matches_a_recomputation_from_the_plan_and_the_usage(
        client: TestClient, october: dict[str, str]) -> None:
    plans = {p["id"]: p for p in client.get("/admin/plans", headers=ADMIN).json()["data"]}
    # Pro at $39 with 3M tokens included, tokens beyond in graduated tiers.
    candidate = {k: v for k, v in plans["pro"].items() if k != "price_per_1k_tokens"} | {
        "base_fee_cents": 3900, "included_tokens": 3_000_000,
        "token_tiers": {"tiers_mode": "graduated", "tiers": [
            {"up_to": 1_000_000, "unit_amount_decimal": "0.0125", "flat_amount_cents": 50},
            {"up_to": None, "unit_amount_decimal": "0.0093"}]}}
    before = by_tenant(sim(client, period="2026-10"))
    rows = by_tenant(sim(client, period="2026-10", plans=[candidate], assign={october["gifted"]: "pro"}))
    month = NOV - OCT

    pro = usage_by_plan(client, october["pro"])
    assert rows[october["pro"]]["revenue_simulated_cents"] == recompute(candidate, total(pro), month)
    # 1.5M tokens beyond the allowance: 1M at 1.25 cents per 1k + 50 flat, 0.5M at 0.93: 3900 + 1300 + 465.
    assert rows[october["pro"]]["revenue_simulated_cents"] == 5665

    late = usage_by_plan(client, october["late"])  # on pro from the 15th: the fee prorated over 17 days
    assert rows[october["late"]]["revenue_simulated_cents"] == recompute(candidate, total(late), ts(2026, 11, 1)
                                                                         - ts(2026, 10, 15))

    switch = usage_by_plan(client, october["switch"])  # payg until the 16th (unchanged), then the candidate
    on_pro = ts(2026, 11, 1) - ts(2026, 10, 16)
    assert rows[october["switch"]]["revenue_simulated_cents"] == (
        recompute(plans["payg"], switch["payg"], 0) + recompute(candidate, switch["pro"], on_pro))

    # Assigned: the whole month on the candidate. Its tokens fall within the allowance, so its usage charges are
    # the first tier's 50 cents flat; of the 100 cents of granted credits it drew, 50 apply (never more than the
    # usage charges), and granted credits' usage is a discount, not revenue.
    gifted = usage_by_plan(client, october["gifted"])
    assert rows[october["gifted"]]["plan_simulated"] == "pro"
    assert recompute(candidate, total(gifted), month) == 3900 + 50
    assert rows[october["gifted"]]["revenue_simulated_cents"] == 3900 + 50 - min(100, 50)
    assert rows[october["gifted"]]["revenue_actual_cents"] == 25

    for name in ("bought", "scale"):  # untouched plans, unassigned: nothing changes
        assert rows[october[name]] == before[october[name]]
    for row in rows.values():
        assert row["margin_simulated_cents"] == row["revenue_simulated_cents"] - row["compute_cost_cents"]


def test_the_running_period_starts_from_the_preview(client: TestClient, october: dict[str, str]) -> None:
    rows = by_tenant(sim(client, period="2026-10"))
    key = client.post(f"/admin/tenants/{october['scale']}/keys", json={}, headers=ADMIN).json()["key"]
    upcoming = client.get("/v1/billing/invoices/upcoming", headers=bearer(key)).json()
    assert rows[october["scale"]]["revenue_actual_cents"] == upcoming["total"]
    assert rows[october["scale"]]["revenue_simulated_cents"] == upcoming["total"]
    # scale: $499 and 10,000,123 tokens beyond its 10M at 0.80 cents per 1k = 8000.0984 -> 8000 cents.
    assert upcoming["total"] == 49_900 + 8000


# --- nothing written ------------------------------------------------------------------------------------------


def dump(services: Services) -> dict[str, list[str]]:
    with services.engine.connect() as conn:
        return {table: sorted(repr(tuple(row)) for row in conn.execute(text(f'SELECT * FROM "{table}"')))
                for table in inspect(conn).get_table_names()}


def test_simulate_writes_no_row(client: TestClient, services: Services, october: dict[str, str],
                                fake_clock: FakeClock) -> None:
    close_october(client, fake_clock)
    for period in ("2026-10", "2026-11"):
        before = dump(services)
        assert sum(map(len, before.values())) > 0
        sim(client, period=period, plans=[{"id": "new", "name": "New", "rpm_limit": 1, "tpm_limit": 1,
                                           "base_fee_cents": 100}], assign={october["pro"]: "new"})
        assert dump(services) == before


# --- refusals ---------------------------------------------------------------------------------------------------


def refused(client: TestClient, body: Any, status: int = 422, code: str | None = None) -> dict[str, Any]:
    return assert_envelope(client.post("/admin/billing/simulate", json=body, headers=ADMIN), status, code=code)


def test_bad_input_is_refused_naming_the_field(client: TestClient, services: Services,
                                               october: dict[str, str]) -> None:
    before = dump(services)
    plan = {"id": "cand", "name": "Candidate", "rpm_limit": 10, "tpm_limit": 10}
    for period in ("2026-13", "26-10", "october", "0000-01"):
        assert refused(client, {"period": period})["param"] == "period"
    assert refused(client, {"period": "2199-01"}, 409, "period_in_future")["param"] == "period"
    bad_tiers = plan | {"token_tiers": {"tiers_mode": "graduated", "tiers": [
        {"up_to": 10, "unit_amount_decimal": "0.01"}, {"up_to": 5, "unit_amount_decimal": "0.01"},
        {"up_to": None, "unit_amount_decimal": "0.01"}]}}
    assert refused(client, {"period": "2026-10", "plans": [plan, bad_tiers]})["param"] == (
        "plans.1.token_tiers.tiers.1.up_to")
    assert refused(client, {"period": "2026-10", "plans": [plan | {"price_per_1k_tokens": 0.5}]})["param"] == (
        "plans.0.price_per_1k_tokens")
    assert refused(client, {"period": "2026-10", "plans": [plan | {"colour": "red"}]}, code="unknown_field")[
        "param"] == "plans.0.colour"
    assert refused(client, {"period": "2026-10", "plans": [plan, plan]}, code="duplicate_plan")["param"] == (
        "plans.1.id")
    # A request body matches its schema exactly: no 10.0 for an integer, no 0 for a boolean, no bad decimal.
    for field, value in (("rpm_limit", 10.0), ("prepaid", 0), ("price_per_request", "1e"),
                         ("price_per_request", "\u00c6")):
        assert refused(client, {"period": "2026-10", "plans": [plan | {field: value}]})["param"] == (
            f"plans.0.{field}")
    assert refused(client, {"period": "2026-10", "assign": {"tn_nobody": "pro"}}, code="unknown_tenant")[
        "param"] == "assign.tn_nobody"
    assert refused(client, {"period": "2026-10", "assign": {october["pro"]: "gold"}}, code="unknown_plan")[
        "param"] == f"assign.{october['pro']}"
    assert refused(client, {"period": "2026-10", "what": 1}, code="unknown_field")["param"] == "what"
    assert refused(client, {"period": "2026-09", "assign": {october["late"]: "pro"}}, code="unknown_tenant")[
        "param"] == f"assign.{october['late']}"  # it did not exist then
    assert dump(services) == before


def test_extreme_candidate_plans_are_priced_exactly(client: TestClient, october: dict[str, str]) -> None:
    """The largest prices and fees a plan admits price in exact integers (no overflow, no float)."""
    pro = next(p for p in client.get("/admin/plans", headers=ADMIN).json()["data"] if p["id"] == "pro")
    huge = pro | {"base_fee_cents": 10**30, "included_tokens": 0, "price_per_1k_tokens": "999999999.99999",
                  "batch_discount_percent": 0}  # an odd micro-cent price cannot be halved exactly
    rows = by_tenant(sim(client, period="2026-10", plans=[huge]))
    # 4.5M tokens: 4,500 x 99,999,999,999.999 cents = 449,999,999,999,995.5 -> half-up 449,999,999,999,996.
    assert rows[october["pro"]]["revenue_simulated_cents"] == 10**30 + 449_999_999_999_996


# --- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_table_json_and_csv(client: TestClient, services: Services, october: dict[str, str],
                                fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    close_october(client, fake_clock)
    settings = services.settings
    for name, value in (("DATA_DIR", str(settings.data_dir)), ("DATABASE_URL", settings.database_url or ""),
                        ("ADMIN_TOKEN", ADMIN_TOKEN)):
        monkeypatch.setenv(f"MODELMETER_{name}", value)
    plans_file = tmp_path / "candidate.json"
    pro = next(p for p in client.get("/admin/plans", headers=ADMIN).json()["data"] if p["id"] == "pro")
    plans_file.write_text(json.dumps({"plans": [pro | {"base_fee_cents": 3900}]}))
    args = ["billing", "simulate", "--period", "2026-10", "--plans", str(plans_file),
            "--assign", f"{october['gifted']}=pro"]
    api = sim(client, period="2026-10", plans=[pro | {"base_fee_cents": 3900}], assign={october["gifted"]: "pro"})

    as_json = CliRunner().invoke(main, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == api

    as_csv = CliRunner().invoke(main, [*args, "--csv"])
    assert as_csv.exit_code == 0, as_csv.output
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["tenant_id"] for r in table] == [r["tenant_id"] for r in api["data"]] + ["(total)"]
    assert int(table[-1]["margin_simulated_cents"]) == api["totals"]["margin_simulated_cents"]
    changes = [int(r["margin_change_cents"]) for r in table[:-1]]
    assert changes == sorted(changes, reverse=True)
    gifted = next(r for r in table if r["tenant_id"] == october["gifted"])
    assert (gifted["plan_simulated"], gifted["revenue_actual_cents"], gifted["revenue_simulated_cents"]) == (
        "pro", "25", "3900")

    human = CliRunner().invoke(main, args)
    assert human.exit_code == 0, human.output
    lines = human.output.splitlines()
    assert lines[0].split()[:4] == ["tenant", "plan", "sim", "plan"]
    assert lines[-1].startswith("(total)")
    gifted_line = next(line for line in lines if line.startswith(october["gifted"]))
    assert gifted_line.split()[1:5] == ["payg", "pro", "$0.25", "$39.00"]
    assert gifted_line.endswith("+$38.75")
    assert lines.index(gifted_line) == 1  # the largest gain first

    for bad, message in ((["--assign", "nobody"], "TENANT=PLAN"), (["--assign", "tn_x=pro"], "assign.tn_x"),
                         (["--plans", str(tmp_path / "missing.json")], "missing.json")):
        result = CliRunner().invoke(main, ["billing", "simulate", "--period", "2026-10", *bad])
        assert result.exit_code != 0
        assert message in result.output
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([pro | {"included_tokens": -1}]))
    result = CliRunner().invoke(main, ["billing", "simulate", "--period", "2026-10", "--plans", str(broken)])
    assert result.exit_code == 1
    assert "plans.0.included_tokens" in result.output


def test_a_candidate_batch_discount_reprices_the_batch_usage_alone(client: TestClient, services: Services,
                                                                   make_tenant: Any, fake_clock: FakeClock) -> None:
    """``batch_discount_percent`` is a plan field like any other: simulating payg at 0% and at 100% off batches
    moves the revenue by exactly the batch lines' charges, and leaves a tenant without batch usage as it was."""
    fake_clock.t = OCT
    bulk, plain = make_tenant(plan="payg")["id"], make_tenant(plan="payg")["id"]
    add_usage(services, bulk, "payg", ts(2026, 10, 3), "breq_sim", kind="batch", requests=4000, tokens=400_000)
    add_usage(services, bulk, "payg", ts(2026, 10, 4), "r_sim_bulk", requests=1000, tokens=100_000)
    add_usage(services, plain, "payg", ts(2026, 10, 4), "r_sim_plain", requests=1000, tokens=100_000)
    fake_clock.t = ts(2026, 10, 25)
    payg = next(p for p in client.get("/admin/plans", headers=ADMIN).json()["data"] if p["id"] == "payg")
    full = by_tenant(sim(client, period="2026-10", plans=[payg | {"batch_discount_percent": 0}]))
    free = by_tenant(sim(client, period="2026-10", plans=[payg | {"batch_discount_percent": 100}]))
    packaged = by_tenant(sim(client, period="2026-10"))
    # 4,000 batch requests at 0.05 cents and 400,000 batch tokens at 0.002 cents: 200 + 800 cents at full price.
    assert full[bulk]["revenue_simulated_cents"] - free[bulk]["revenue_simulated_cents"] == 1000
    assert packaged[bulk]["revenue_simulated_cents"] - free[bulk]["revenue_simulated_cents"] == 500  # payg: 50%
    assert full[plain]["revenue_simulated_cents"] == free[plain]["revenue_simulated_cents"]
