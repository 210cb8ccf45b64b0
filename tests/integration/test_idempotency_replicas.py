"""Two gateway processes sharing PostgreSQL answer one Idempotency-Key as one: the second replays the first's
answer, and refuses the key for another request."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from modelmeter.settings import Settings
from tests.conftest import ADMIN, ON_POSTGRES, REDIS_URL, assert_envelope
from tests.integration.test_billing_concurrency import _free_port, _start_gateway, _wait_ready

TENANT = {"name": "Acme", "email": "ops@acme.test", "plan": "payg"}


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.skipif(not (ON_POSTGRES and REDIS_URL), reason="needs PostgreSQL and Redis (CI sets both)")
def test_a_key_used_on_one_replica_replays_on_another(settings: Settings) -> None:
    packaged = Path(__file__).parents[2] / "src/modelmeter/billing/plans.json"
    settings = settings.model_copy(update={"plans_file": packaged})
    ports = [_free_port(), _free_port()]
    processes = [_start_gateway(settings, port) for port in ports]
    try:
        first_url, second_url = (f"http://127.0.0.1:{port}" for port in ports)
        for url in (first_url, second_url):
            _wait_ready(url)
        headers = {**ADMIN, "Idempotency-Key": "across-replicas"}
        with httpx.Client(timeout=30) as http:
            first = http.post(f"{first_url}/admin/tenants", json=TENANT, headers=headers)
            assert first.status_code == 201, first.text
            replayed = http.post(f"{second_url}/admin/tenants", json=TENANT, headers=headers)
            assert replayed.status_code == 201
            assert replayed.headers["idempotent-replayed"] == "true"
            assert replayed.json() == first.json()
            other = http.post(f"{second_url}/admin/tenants", json={**TENANT, "name": "Other"}, headers=headers)
            assert_envelope(other, 422, code="idempotency_key_reused")
            listed = http.get(f"{second_url}/admin/tenants", headers=ADMIN).json()["data"]
        assert [t["id"] for t in listed] == [first.json()["id"]]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
