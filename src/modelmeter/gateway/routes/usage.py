"""``GET /v1/usage``: the tenant's usage in time buckets, grouped by model, key or plan, with costs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from modelmeter import clock
from modelmeter.billing.usage import UsageBucket, UsageQuery, usage_buckets
from modelmeter.fields import INT32_MAX
from modelmeter.gateway.deps import BillingPrincipal, ServicesDep, SessionDep
from modelmeter.gateway.schemas import TENANT_READ, errors
from modelmeter.shapes import Page

router = APIRouter(tags=["usage"])

Timestamp = Annotated[int, Query(ge=0, le=INT32_MAX)]  # the ledger's timestamps are 32-bit integers


@router.get("/v1/usage", response_model=Page[UsageBucket], response_model_exclude_unset=True,
            responses=errors(*TENANT_READ))
def get_usage(
    principal: BillingPrincipal,
    services: ServicesDep,
    session: SessionDep,
    start_time: Timestamp,
    end_time: Timestamp | None = None,
    bucket_width: Literal["1h", "1d"] = "1d",
    group_by: Literal["model", "key", "plan"] | None = None,
) -> Page[UsageBucket]:
    """Requests, tokens, training tokens and cost per bucket (buckets align to UTC hours or days). One answer
    covers at most 31 days of 1h buckets or 366 days of 1d buckets; a wider range answers that much with
    ``has_more: true`` (ask again from ``start_time`` plus that span)."""
    query, has_more = UsageQuery(start_time, end_time if end_time is not None else clock.now_s() + 1, bucket_width,
                                 group_by).page()
    buckets = usage_buckets(session=session, catalog=services.plans, tenant_id=principal.tenant_id, q=query,
                            current_plan=principal.plan)
    return Page.of(buckets, has_more)
