"""The CLI verbs mirror the admin API, with human text by default and JSON with --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelmeter.cli import main


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
