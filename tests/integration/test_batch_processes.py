"""A gateway process killed (SIGKILL) in the middle of a batch: another resumes it once the lease lapses, and
every line is answered once in the output and billed once in the ledger. The first serves on its in-process
engine, the second through an engine process: the invoice's batch lines recompute to the cent after both."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import httpx
import pytest
from sqlmodel import func, select

from modelmeter.billing.tables import UsageEvent
from modelmeter.gateway.services import services_of
from modelmeter.models.batches import line_request_id
from modelmeter.settings import Settings
from tests.conftest import ADMIN, bearer
from tests.support.gateways import start_gateway
from tests.support.invoices import assert_upcoming_recomputes
from tests.support.net import free_port, wait_ready
from tests.support.tenants import tenant_with_model

pytestmark = pytest.mark.slow  # a minute of processes: once per CI run, on PostgreSQL + Redis

LINES = 1500
# A simulated device, so the batch lasts long enough here to be killed in its middle; a short lease.
GATEWAY_ENV = {"MODELMETER_SIMULATED_DEVICE": "batch_ms=40,row_us=0", "MODELMETER_BATCH_INTERVAL_S": "0.2",
               "MODELMETER_BATCH_LEASE_S": "3"}


def _batch(base: str, key: str, model: str) -> str:
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/classify",
              "body": {"model": model, "input": f"ticket {i}"}} for i in range(LINES)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with httpx.Client(base_url=base, headers=bearer(key), timeout=60) as http:
        uploaded = http.post("/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"})
        assert uploaded.status_code == 200, uploaded.text
        created = http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/classify",
                                                 "completion_window": "24h"})
        assert created.status_code == 200, created.text
        return str(created.json()["id"])


def _counts(base: str, key: str, batch_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base}/v1/batches/{batch_id}", headers=bearer(key), timeout=30).json())


def test_a_killed_gateway_leaves_its_batch_to_another_which_finishes_it_once(settings: Settings) -> None:
    quiet = settings.model_copy(update={"batch_interval_s": 0})  # this test's own client serves no batch
    client, _, key, model = tenant_with_model(quiet, "payg")
    try:
        port = free_port()
        first = start_gateway(settings, port, GATEWAY_ENV)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base)
        batch_id = _batch(base, key, model)
        deadline = time.monotonic() + 120
        while _counts(base, key, batch_id)["request_counts"]["completed"] < 100:
            assert time.monotonic() < deadline, "the first gateway served nothing"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        with services_of(client.app).sessions() as session:
            billed_at_kill = session.exec(select(func.count()).select_from(UsageEvent)).one()
        assert 100 <= billed_at_kill < LINES, billed_at_kill  # killed in the middle

        port = free_port()
        second = start_gateway(settings, port, GATEWAY_ENV, ["--engine", "process"])  # the other engine
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base)
            deadline = time.monotonic() + 180
            while (batch := _counts(base, key, batch_id))["status"] != "completed":
                assert batch["status"] == "in_progress", batch
                assert time.monotonic() < deadline, batch
                time.sleep(0.2)
            assert batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
            content = httpx.get(f"{base}/v1/files/{batch['output_file_id']}/content", headers=bearer(key), timeout=60)
            answers = [json.loads(line) for line in content.content.splitlines()]
        finally:
            second.terminate()
            second.wait(timeout=30)
        assert sorted(a["custom_id"] for a in answers) == sorted(f"line-{i}" for i in range(LINES))  # each once
        assert {a["response"]["status_code"] for a in answers} == {200}
        with services_of(client.app).sessions() as session:
            billed = session.exec(select(UsageEvent.request_id)).all()
        assert sorted(billed) == sorted(line_request_id(batch_id, f"line-{i}") for i in range(LINES))  # once each
        # Served by engine processes this time: the invoice's batch lines still recompute to the cent.
        now = int(time.time())
        billed_lines = assert_upcoming_recomputes(client.get, bearer(key), ADMIN, "payg", now - 40 * 86400, now + 1)
        assert set(billed_lines) == {"batch_requests", "batch_tokens"}
    finally:
        client.__exit__(None, None, None)
