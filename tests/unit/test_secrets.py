"""Weak and placeholder secrets: `serve` refuses to start with them (exit 2, naming the setting), and every value
deploy/ ships for a checked setting is a placeholder the check knows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelmeter.cli.main import main
from modelmeter.settings import PLACEHOLDER_SECRETS, Settings, weak_secrets

DEPLOY = Path(__file__).parents[2] / "deploy"
CHECKED = ("MODELMETER_ADMIN_TOKEN", "MODELMETER_DASHBOARD_SECRET", "MODELMETER_STRIPE_WEBHOOK_SECRET",
           "MODELMETER_METRICS_TOKEN")
GOOD = "a" * 16 + "0123456789abcdef"  # 32 characters


def _shipped() -> set[str]:
    values = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".env", ""}:
            for name, value in re.findall(r'^\s*(MODELMETER_[A-Z_]+):\s*"?([^\s"]*)"?\s*$', path.read_text(), re.M):
                if name in CHECKED and value and not value.startswith("$"):  # ${...}: the operator's own
                    values.add(value)
    return values


def test_every_shipped_value_is_a_known_placeholder() -> None:
    shipped = _shipped()
    assert shipped, "deploy/k8s/secret.yaml ships placeholders for these settings"
    assert shipped <= PLACEHOLDER_SECRETS


@pytest.mark.parametrize("field", ["admin_token", "dashboard_secret", "stripe_webhook_secret", "metrics_token"])
def test_short_and_placeholder_values_are_named(field: str, tmp_path: Path) -> None:
    variable = "MODELMETER_" + field.upper()
    for bad in ("x" * 31, *sorted(PLACEHOLDER_SECRETS)):
        settings = Settings(data_dir=tmp_path, _env_file=None, **{field: bad})  # type: ignore[call-arg]
        problems = weak_secrets(settings)
        assert len(problems) == 1
        assert problems[0].startswith(variable)
    assert weak_secrets(Settings(data_dir=tmp_path, _env_file=None, **{field: GOOD})) == []  # type: ignore[call-arg]


@pytest.mark.parametrize(("variable", "value"), [
    ("MODELMETER_ADMIN_TOKEN", "mmadmin_change-me"),
    ("MODELMETER_ADMIN_TOKEN", "mmadmin_short"),
    ("MODELMETER_DASHBOARD_SECRET", "change-me-to-32-random-bytes"),
    ("MODELMETER_STRIPE_WEBHOOK_SECRET", "whsec_123"),
])
def test_serve_refuses_to_start(variable: str, value: str, tmp_path: Path) -> None:
    env = {"MODELMETER_DATA_DIR": str(tmp_path), "MODELMETER_ADMIN_TOKEN": "mmadmin_" + GOOD, variable: value}
    result = CliRunner().invoke(main, ["serve", "--port", "1"], env=env)
    assert result.exit_code == 2, result.output
    assert variable in result.output
    assert "refusing to start" in result.output


def test_the_data_dir_and_database_are_private(tmp_path: Path) -> None:
    """Before: the data dir was 0755 and the SQLite database 0644, alert secrets readable by any local user."""
    import os
    import stat

    from modelmeter import db
    from modelmeter.settings import private_data_dir

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    settings = Settings(data_dir=data, _env_file=None)  # type: ignore[call-arg]
    assert stat.S_IMODE(private_data_dir(settings).stat().st_mode) == 0o700
    database = data / "modelmeter.db"
    database.touch(mode=0o644)
    os.chmod(database, 0o644)
    engine = db.make_engine(f"sqlite:///{database}")
    db.upgrade(engine)
    engine.dispose()
    for part in data.iterdir():
        assert stat.S_IMODE(part.stat().st_mode) & 0o077 == 0, part.name
