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
