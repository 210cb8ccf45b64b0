"""The CLI verbs mirror the admin API, with human text by default and JSON with --json."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelmeter.billing.economics import UnitEconomics
from modelmeter.cli import main
from modelmeter.cli.admin import _economics_line
from modelmeter.money import MICRO_PER_CENT, micro_to_cents


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> CliRunner:
    monkeypatch.setenv("MODELMETER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MODELMETER_DATABASE_URL", database_url)
    return CliRunner()


def _json(runner: CliRunner, *args: str) -> dict:
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_tenant_and_key_verbs(runner: CliRunner) -> None:
    tenant = _json(runner, "tenant", "create", "--name", "Acme", "--email", "ops@acme.test", "--plan", "pro")
    assert tenant["plan"] == "pro"
    assert tenant["status"] == "active"
    assert [t["id"] for t in _json(runner, "tenant", "list")["data"]] == [tenant["id"]]
    assert _json(runner, "tenant", "show", tenant["id"])["email"] == "ops@acme.test"
    assert _json(runner, "tenant", "update", tenant["id"], "--status", "suspended")["status"] == "suspended"

    key = _json(runner, "key", "create", tenant["id"], "--scope", "inference")
    assert key["key"].startswith("mm_")
    assert key["scopes"] == ["inference"]
    listed = runner.invoke(main, ["key", "list", tenant["id"]])
    assert key["prefix"] in listed.output
    assert key["key"] not in listed.output
    rolled = _json(runner, "key", "roll", key["id"], "--grace", "0")
    assert rolled["key"] != key["key"]
    assert _json(runner, "key", "revoke", rolled["id"])["status"] == "revoked"
    refused = runner.invoke(main, ["key", "roll", rolled["id"]])  # the admin API's rule, from the same function
    assert refused.exit_code == 1
    assert "Only an active key can be rolled. (conflict_error)" in refused.output


def test_human_output_and_errors(runner: CliRunner) -> None:
    created = runner.invoke(main, ["tenant", "create", "--name", "Acme", "--email", "ops@acme.test"])
    assert created.exit_code == 0
    assert created.stdout.startswith("created ten_")
    bad_plan = runner.invoke(main, ["tenant", "create", "--name", "B", "--email", "b@b.co", "--plan", "gold"])
    assert bad_plan.exit_code == 1
    assert "Unknown plan 'gold'" in bad_plan.output
    missing = runner.invoke(main, ["tenant", "show", "ten_nope"])
    assert missing.exit_code == 1
    assert "No tenant" in missing.output


def test_plans_and_db_upgrade(runner: CliRunner) -> None:
    plans = _json(runner, "plans")
    assert [p["id"] for p in plans["data"]][:3] == ["free", "payg", "pro"]
    upgraded = runner.invoke(main, ["db", "upgrade"])
    assert upgraded.exit_code == 0
    assert "revision" in upgraded.output


def test_plans_text_shows_money_in_the_display_form(runner: CliRunner) -> None:
    text = runner.invoke(main, ["plans"]).stdout
    lines = {line.split()[0]: line for line in text.splitlines() if not line.startswith(" ")}
    assert "fee=$49.00 " in lines["pro"]  # not 4900¢
    assert "per_1k=$0.02 per_req=0.05¢ " in lines["payg"]  # $0.0200 per 1k tokens, $0.0005 per request
    assert "fee=$499.00 " in lines["scale"]
    assert ("token_tiers: graduated: 1\u2013100,000,000 at 0.8¢; 100,000,001\u20131,000,000,000 at 0.5¢; "
            "1,000,000,001 and above at 0.3¢") in text
    assert all(re.fullmatch(r"\$[0-9][0-9,]*\.[0-9]{2}", a) for a in re.findall(r"\$[0-9.,]+[0-9]", text))


@pytest.mark.parametrize(("exact", "cost"), [
    ("6.944444", "cost=$0.07 (6.94444¢)"),  # a sub-cent part: at most six significant digits
    ("0.069444", "cost=$0.00 (0.069444¢)"),  # one second of a GPU at $2.50/h
    ("125.000000", "cost=$1.25 "),  # whole cents: nothing to add
    ("12345.678901", "cost=$123.46 "),  # a dollar or more: the amount says it all
])
def test_economics_line_shows_the_exact_cost_only_when_it_adds(exact: str, cost: str) -> None:
    row = UnitEconomics(object="unit_economics", period="2026-11", tenant_id="ten_a", currency="usd",
                        revenue_cents=4900, revenue_source="invoice", margin_ratio="0.9986", requests=10, tokens=1000,
                        training_tokens=0, compute_cost_cents=micro_to_cents(int(Decimal(exact) * MICRO_PER_CENT)),
                        compute_cost_cents_decimal=exact, cpu_compute_ms=0, gpu_compute_ms=0, margin_cents=0)
    line = _economics_line(row)
    assert cost in line
    assert "revenue=      $49.00" in line


def test_serve_refuses_several_processes_without_shared_limits(runner: CliRunner,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELMETER_REDIS_URL", raising=False)
    result = runner.invoke(main, ["serve", "--workers", "2"])
    assert result.exit_code == 2
    assert "MODELMETER_REDIS_URL" in result.output


def test_admin_token_is_printed_once_by_whichever_verb_runs_first(runner: CliRunner) -> None:
    first = runner.invoke(main, ["tenant", "list"])
    assert "Admin token (shown once" in first.stderr
    second = runner.invoke(main, ["tenant", "list"])
    assert "Admin token" not in second.stderr


def test_credits_verbs(runner: CliRunner) -> None:
    tenant = _json(runner, "tenant", "create", "--name", "Acme", "--email", "ops@acme.test", "--plan", "payg")
    granted = _json(runner, "credits", "grant", tenant["id"], "--amount-cents", "2500", "--description", "Launch",
                    "--expires-at", "2051222400")
    assert (granted["object"], granted["source"], granted["amount_cents"], granted["remaining_cents"]) == \
        ("credit_grant", "granted", 2500, 2500)
    assert (granted["description"], granted["expires_at"], granted["status"]) == ("Launch", 2051222400, "active")
    human = runner.invoke(main, ["credits", "grant", tenant["id"], "--amount-cents", "150"])
    assert human.exit_code == 0, human.output
    assert human.stdout.startswith("granted cg_")
    assert "amount=       $1.50" in human.stdout
    assert "no expiry" in human.stdout

    listed = _json(runner, "credits", "list", tenant["id"])
    assert (listed["object"], listed["balance_cents"], listed["has_more"]) == ("list", 2650, False)
    assert [g["amount_cents"] for g in listed["data"]] == [150, 2500]  # newest first
    text = runner.invoke(main, ["credits", "list", tenant["id"]]).stdout
    assert granted["id"] in text
    assert "Launch" in text
    assert text.rstrip().endswith("balance $26.50")


def test_credits_refusals(runner: CliRunner) -> None:
    tenant = _json(runner, "tenant", "create", "--name", "Acme", "--email", "ops@acme.test")
    for args, message in (
        (["grant", "ten_nope", "--amount-cents", "100"], "No tenant"),
        (["list", "ten_nope"], "No tenant"),
        (["grant", tenant["id"], "--amount-cents", "0"], "amount_cents: Input should be greater than or equal to 1"),
        (["grant", tenant["id"], "--amount-cents", "-5"], "amount_cents"),
        (["grant", tenant["id"], "--amount-cents", "100", "--expires-at", "1000"], "expires_at must be in the future"),
    ):
        result = runner.invoke(main, ["credits", *args])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)
    assert runner.invoke(main, ["credits", "grant", tenant["id"]]).exit_code == 2  # --amount-cents is required
    assert _json(runner, "credits", "list", tenant["id"]) == {"object": "list", "data": [], "has_more": False,
                                                              "balance_cents": 0}  # nothing partial written
