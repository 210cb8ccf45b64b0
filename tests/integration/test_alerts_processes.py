"""Usage alerts with real gateway processes: kill -9 between the usage commit and the delivery loses no event, and
two gateways sharing PostgreSQL and Redis fire exactly one event per threshold under concurrent requests."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from modelmeter.settings import Settings
from tests.conftest import ADMIN, ON_POSTGRES, REDIS_URL, bearer
from tests.support.alerts import TOKENS_PER_X, Receiver, verify
from tests.support.gateways import running_gateways, start_gateway, warm_then_burst
from tests.support.net import free_port, wait_ready
from tests.support.plans import with_plans
from tests.support.tenants import tenant_with_model

pytestmark = pytest.mark.slow

PLANS = [{"id": "hundred_x", "name": "A hundred x", "included_tokens": 100 * TOKENS_PER_X,
          "price_per_1k_tokens": "0.01", "rpm_limit": 100000, "tpm_limit": 100000000}]


@pytest.fixture
def plans_settings(settings: Settings, tmp_path: Path) -> Settings:
    # The receiver listens on 127.0.0.1: private URLs are allowed here (refused by default).
    return with_plans(settings, tmp_path, PLANS, alerts_relay_interval_s=0, alerts_allow_private_urls=True)


def _gateway(settings: Settings, port: int, *, relay_s: float) -> subprocess.Popen[bytes]:
    return start_gateway(settings, port, _alerts_env(relay_s))


def _alerts_env(relay_s: float) -> dict[str, str]:
    return {"MODELMETER_ALERTS_RELAY_INTERVAL_S": str(relay_s),
            "MODELMETER_ALERTS_ALLOW_PRIVATE_URLS": "1"}  # the receiver listens on 127.0.0.1


def _events(client: TestClient, key: str) -> list[dict[str, object]]:
    response = client.get("/v1/events", headers=bearer(key), params={"limit": 100})
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["data"]))


def test_kill_9_after_the_usage_commit_loses_no_event(plans_settings: Settings,
                                                      receiver: Callable[[list[int | str]], Receiver]) -> None:
    hook = receiver([200])
    client, _, key, model = tenant_with_model(plans_settings, "hundred_x")
    try:
        secret = client.put("/v1/billing/alerts", json={"thresholds": [50], "url": hook.url},
                            headers=bearer(key)).json()["secret"]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        gateway = _gateway(plans_settings, port, relay_s=0)  # relay off: the event can only be in the database
        try:
            wait_ready(url)
            served = httpx.post(f"{url}/v1/classify", json={"model": model, "input": ["x"] * 60},
                                headers=bearer(key), timeout=60)
            assert served.status_code == 200, served.text
        finally:
            gateway.send_signal(signal.SIGKILL)
            gateway.wait(timeout=30)
        assert hook.received == []
        [event] = _events(client, key)
        restarted = _gateway(plans_settings, port, relay_s=0.2)
        try:
            wait_ready(url)
            deadline = time.monotonic() + 30
            while not hook.received and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            restarted.terminate()
            restarted.wait(timeout=30)
        [(headers, body)] = hook.received
        assert json.loads(body) == event
        verify(secret, headers, body)
        assert _events(client, key) == [event]
        [delivery] = client.get("/admin/events/deliveries", headers=ADMIN).json()["data"]
        assert (delivery["event_id"], delivery["status"]) == (event["id"], "done")
    finally:
        client.__exit__(None, None, None)


@pytest.mark.anyio
@pytest.mark.skipif(not (ON_POSTGRES and REDIS_URL), reason="needs PostgreSQL and Redis (CI sets both)")
async def test_two_gateways_fire_each_threshold_exactly_once(plans_settings: Settings) -> None:
    client, _, key, model = tenant_with_model(plans_settings, "hundred_x")
    thresholds = list(range(10, 110, 10))
    assert client.put("/v1/billing/alerts", json={"thresholds": thresholds, "url": "https://example.com/hook"},
                      headers=bearer(key)).status_code == 200
    try:
        with running_gateways(plans_settings, extra_env=_alerts_env(0)) as urls:
            # 2 of the 100 "x" included to warm up, then 40 requests of 3: 122% in all
            responses = await warm_then_burst(urls, model, key, 40, warm_input=["x"], burst_input=["x"] * 3)
        assert [r.status_code for r in responses] == [200] * 40
        events = _events(client, key)
        assert sorted(e["data"]["threshold_percent"] for e in events) == thresholds  # type: ignore[index]
        assert all(e["data"]["period"] == events[0]["data"]["period"] for e in events)  # type: ignore[index]
    finally:
        client.__exit__(None, None, None)
