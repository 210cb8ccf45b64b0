"""Two gateway processes sharing PostgreSQL answer one Idempotency-Key as one: the second replays the first's
answer, and refuses the key for another request."""

from __future__ import annotations

import httpx
import pytest

from modelmeter.settings import Settings
from tests.conftest import ADMIN, ON_POSTGRES, REDIS_URL, assert_envelope
from tests.support.gateways import running_gateways
from tests.support.plans import PACKAGED_PLANS

TENANT = {"name": "Acme", "email": "ops@acme.test", "plan": "payg"}


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.skipif(not (ON_POSTGRES and REDIS_URL), reason="needs PostgreSQL and Redis (CI sets both)")
def test_a_key_used_on_one_replica_replays_on_another(settings: Settings) -> None:
    settings = settings.model_copy(update={"plans_file": PACKAGED_PLANS})
    with running_gateways(settings) as (first_url, second_url):
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
