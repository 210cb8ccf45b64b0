"""Usage put straight into the ledger, as the gateway records it after serving a request."""

from __future__ import annotations

from typing import Any

from modelmeter.billing.ledger import UsageRecord, record_usage
from modelmeter.gateway.services import Services


def add_usage(services: Services, tenant_id: str, plan: str, at: int, request_id: str, **fields: Any) -> None:
    """One usage record of model ``m`` for ``tenant_id`` on ``plan`` at ``at`` (``fields``: tokens, requests, ...)."""
    record = UsageRecord(request_id=request_id, tenant_id=tenant_id, model_id="m", created=at, plan=plan, **fields)
    with services.sessions() as session:
        record_usage(session=session, records=[record])
        session.commit()
