"""The public API against its own OpenAPI document: schemathesis (``--checks all``: no 5xx, documented statuses,
content types and headers, response schemas, schema-valid requests accepted and invalid ones refused, auth not
ignored, 405s with their ``Allow``) on a live gateway, tenant and admin routes, with a fixed seed and a time
budget. The one exception it is configured with is explained in ``tests/contract/schemathesis.toml``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN
from tests.support.live_server import LiveServer

CONFIG = Path(__file__).resolve().parents[1] / "contract" / "schemathesis.toml"
BUDGET_S = int(os.environ.get("MODELMETER_FUZZ_SECONDS", "90"))
SEED = 20261202

pytestmark = pytest.mark.slow  # a time budget, not a unit test: it runs in CI's PostgreSQL + Redis pass


def _schemathesis(server: LiveServer, token: str, paths: str) -> str:
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "--no-color", "run",
        f"{server.url}/openapi.json", "--checks", "all", "--seed", str(SEED), "--max-time", str(BUDGET_S),
        "--generation-database", "none", "--include-path-regex", paths, "-H", f"Authorization: Bearer {token}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUDGET_S + 240, check=False)
    output = done.stdout + done.stderr
    summary = re.search(r"(\d+) generated", output)
    print(f"schemathesis {paths}: {summary.group(0) if summary else 'no summary'}")  # the count, in CI's log
    assert done.returncode == 0, output[-20_000:]
    assert summary is not None, output[-5_000:]
    assert int(summary.group(1)) > 100, output[-5_000:]
    return output


def test_tenant_routes_keep_their_contract(live_server: LiveServer, make_tenant: Any, make_key: Any) -> None:
    tenant = make_tenant(plan="pro")
    key = make_key(tenant["id"])["key"]
    _schemathesis(live_server, key, r"^/(v1|models)/")


def test_admin_routes_keep_their_contract(live_server: LiveServer) -> None:
    _schemathesis(live_server, ADMIN_TOKEN, r"^/admin/")
