"""Usage read back from the ledger: time buckets grouped by model, key or plan, each with its cost.

A bucket's cost is the usage charge of its requests at the plan's prices, allowances being consumed in time
order within each period (so the costs of a period add up to its invoice's usage lines before rounding). On a plan
with volume tiers a bucket's cost can be negative: the usage that moves the period into a cheaper tier reprices
every unit of the period (``pricing.marginal_cost_micro``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from sqlalchemy import literal_column
from sqlalchemy import select as sa_select
from sqlmodel import Session, col

from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.periods import period_bounds, period_of
from modelmeter.billing.pricing import Usage, marginal_cost_micro
from modelmeter.billing.spend import usage_of, usage_sums
from modelmeter.billing.tables import UsageEvent
from modelmeter.errors import InvalidRequestError
from modelmeter.fields import INT32_MAX
from modelmeter.money import cents_text, micro_to_cents
from modelmeter.shapes import Public

GroupBy = Literal["model", "key", "plan"]
WIDTHS = {"1h": 3600, "1d": 86400}
MAX_SPAN = {"1h": 31 * 86400, "1d": 366 * 86400}


@dataclass(frozen=True)
class UsageQuery:
    start: int
    end: int
    bucket_width: str
    group_by: GroupBy | None

    def page(self) -> tuple[UsageQuery, bool]:
        """The part of the range one answer covers, and whether more follows.

        Any range the schema allows is answered (no cross-field refusal a client could not foresee): an empty or
        reversed range has no buckets; a range wider than ``MAX_SPAN`` answers its first ``MAX_SPAN`` with
        ``has_more`` (continue with ``start_time`` moved on by that span)."""
        if self.bucket_width not in WIDTHS:
            raise InvalidRequestError("bucket_width must be 1h or 1d.", code="invalid_value", param="bucket_width")
        end = min(max(self.end, self.start), INT32_MAX)  # the ledger's timestamps are 32-bit integers
        span = MAX_SPAN[self.bucket_width]
        if end - self.start > span:
            return replace(self, end=min(self.start + span, INT32_MAX)), True
        return replace(self, end=end), False


def _group_column(group_by: GroupBy | None) -> Any:
    return {"model": col(UsageEvent.model_id), "key": col(UsageEvent.key_id), "plan": col(UsageEvent.plan)}.get(
        group_by or "", literal_column("''"))


def _rows(*, session: Session, tenant_id: str, q: UsageQuery) -> list[tuple[Any, ...]]:
    """Aggregates from the start of the first period touched (allowances) to the end of the range."""
    width = WIDTHS[q.bucket_width]
    first = period_bounds(period_of(q.start))[0]
    bucket = (col(UsageEvent.created) // width * width).label("bucket")
    group = _group_column(q.group_by).label("grp")
    query = (
        sa_select(bucket, group, col(UsageEvent.period), col(UsageEvent.plan), *usage_sums())
        .where(col(UsageEvent.tenant_id) == tenant_id)
        .where(col(UsageEvent.created) >= first, col(UsageEvent.created) < q.end)
        .group_by("bucket", "grp", col(UsageEvent.period), col(UsageEvent.plan))
        .order_by("bucket", "grp")
    )
    return [tuple(row) for row in session.execute(query).all()]


def usage_buckets(*, session: Session, catalog: PlanCatalog, tenant_id: str, q: UsageQuery,
                  current_plan: str) -> list[UsageBucket]:
    """Buckets of ``q.bucket_width`` within ``[q.start, q.end)`` with per-group results."""
    width = WIDTHS[q.bucket_width]
    consumed: dict[tuple[str, str], Usage] = defaultdict(Usage)
    results: dict[int, dict[Any, dict[str, int]]] = defaultdict(dict)
    for bucket, group, period, plan, *sums in _rows(session=session, tenant_id=tenant_id, q=q):
        amount = usage_of(sums)
        plan_obj = catalog.get(plan or current_plan)
        before = consumed[(period, plan)]
        consumed[(period, plan)] = before + amount
        if int(bucket) < q.start - q.start % width:
            continue
        cost = marginal_cost_micro(plan_obj, before, amount)
        counts = asdict(amount) | {"cost": cost}
        slot = results[int(bucket)].setdefault(group, dict.fromkeys(counts, 0))
        for name, value in counts.items():
            slot[name] += value
    return [_bucket(start, width, q.group_by, groups) for start, groups in sorted(results.items())]


class UsageResult(Public):
    object: Literal["usage.result"]
    requests: int
    tokens: int
    training_tokens: int
    batch_requests: int  # of ``requests``, those served by the Batch API (priced at the plan's batch discount)
    batch_tokens: int  # of ``tokens``, those of batch requests
    cost_cents: int
    cost_cents_decimal: str
    model: str | None = None  # with group_by=model
    key_id: str | None = None  # with group_by=key
    plan: str | None = None  # with group_by=plan


class UsageBucket(Public):
    object: Literal["bucket"]
    start_time: int
    end_time: int
    results: list[UsageResult]


_GROUP_FIELD = {"model": "model", "key": "key_id", "plan": "plan"}


def _bucket(start: int, width: int, group_by: GroupBy | None, groups: dict[Any, dict[str, int]]) -> UsageBucket:
    out = []
    for group, slot in sorted(groups.items(), key=lambda kv: str(kv[0])):
        cost = slot["cost"]
        # Only the grouping's own field is set (the route answers with ``exclude_unset``).
        grouping = {_GROUP_FIELD[group_by]: group} if group_by is not None else {}
        out.append(UsageResult(object="usage.result", requests=slot["requests"], tokens=slot["tokens"],
                               training_tokens=slot["training_tokens"], batch_requests=slot["batch_requests"],
                               batch_tokens=slot["batch_tokens"], cost_cents=micro_to_cents(cost),
                               cost_cents_decimal=cents_text(cost), **grouping))
    return UsageBucket(object="bucket", start_time=start, end_time=start + width, results=out)
