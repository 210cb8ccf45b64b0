"""A client of its own on given settings, with one tenant, its key, and a tiny model of its own registered."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from modelmeter.gateway.app import create_app
from modelmeter.gateway.services import services_of
from modelmeter.settings import Settings
from tests.conftest import ADMIN


def tenant_with_model(settings: Settings, plan: str, **overrides: Any) -> tuple[TestClient, str, str, str]:
    """An entered client on ``settings`` (the caller exits it), a tenant on ``plan`` (patched with ``overrides``),
    a key of its, and a tiny text classifier it owns: ``(client, tenant_id, key, model_id)``."""
    from modelmeter import clock
    from modelmeter.models.registry import MlModel
    from tests.tiny_bert import make_tiny_bert

    client = TestClient(create_app(settings))
    client.__enter__()
    tenant = client.post("/admin/tenants", json={"name": "c", "email": "c@c.co", "plan": plan}, headers=ADMIN).json()
    if overrides:
        client.patch(f"/admin/tenants/{tenant['id']}", json=overrides, headers=ADMIN)
    key = client.post(f"/admin/tenants/{tenant['id']}/keys", json={}, headers=ADMIN).json()["key"]
    make_tiny_bert(settings.data_dir / "models" / tenant["id"] / "m", "text-classification")
    with services_of(client.app).sessions() as session:
        session.add(MlModel(id=f"m-{tenant['id']}", owner_tenant_id=tenant["id"], base_model="tiny", task=
                            "text-classification", labels_json='["negative", "positive"]',
                            artifact=f"models/{tenant['id']}/m", created=clock.now_s()))
        session.commit()
    return client, tenant["id"], key, f"m-{tenant['id']}"
