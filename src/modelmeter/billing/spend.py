"""What a tenant has spent this period: two figures with two names, and why there are two.

- ``budget_spend_micro``: the period's whole usage priced on the tenant's *current* plan. This is the figure the
  budget is enforced on: the quota store's counters hold the period's usage totals, not a cost per plan, and
  ``Caps`` prices those totals on the plan the request is admitted under (``meter.quota_caps``). The
  subscription's ``budget.spent_cents``, the dashboard's "Usage spend" card and the ``budget`` utilisation gauge
  show it, so that what they say is what the next request is admitted or refused on.
- ``billed_spend_micro``: each plan's usage priced on *that* plan (the plan each ledger row was served under).
  This is what the invoice charges for usage (``invoicing``); the alert webhooks (``alerts``), whose
  ``usage.threshold_crossed`` events tell a tenant what it will be billed, use it too.

The two agree whenever the plan did not change within the period; after a mid-period change the first is the
stricter reading of the budget (all usage at the new plan's prices), the second the amount on the invoice.
Worked example: 1,000,000 tokens on a plan at 0.001 c/token, then a change to a plan at 0.002 c/token and 500,000
more: ``billed`` = 1,000 + 1,000 = 2,000 cents; ``budget`` = 1,500,000 x 0.002 = 3,000 cents.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import case, func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col

from modelmeter.billing.catalog import Plan, PlanCatalog
from modelmeter.billing.pricing import Usage, usage_cost_micro
from modelmeter.billing.tables import BATCH_KIND, UsageEvent


def usage_sums() -> list[Any]:
    """The ledger aggregates that make a ``Usage`` (read back with :func:`usage_of`), batch lines apart: the one
    place a query says what usage is."""
    batch = col(UsageEvent.kind) == BATCH_KIND
    return [func.sum(UsageEvent.requests), func.sum(UsageEvent.tokens), func.sum(UsageEvent.training_tokens),
            func.sum(case((batch, col(UsageEvent.requests)), else_=0)),
            func.sum(case((batch, col(UsageEvent.tokens)), else_=0))]


def usage_of(sums: Iterable[Any]) -> Usage:
    """The ``Usage`` of a row's :func:`usage_sums` columns (NULL sums of no rows are 0)."""
    return Usage(*(int(value or 0) for value in sums))


def period_usage(*, session: Session, tenant_id: str, period: str) -> Usage:
    """Committed usage of a tenant's period, from the ledger, whatever plan it was served under."""
    query = sa_select(*usage_sums()).where(col(UsageEvent.tenant_id) == tenant_id, col(UsageEvent.period) == period)
    return usage_of(session.execute(query).one())


def usage_by_plan(conn: Connection, *, tenant_id: str, period: str) -> dict[str, Usage]:
    """Committed usage of a tenant's period, per plan it was served under (``session.connection()`` from a
    session; the ledger's alert hook passes the connection of the rows it just wrote)."""
    query = (sa_select(col(UsageEvent.plan), *usage_sums())
             .where(col(UsageEvent.tenant_id) == tenant_id, col(UsageEvent.period) == period)
             .group_by(col(UsageEvent.plan)))
    return {row[0]: usage_of(row[1:]) for row in conn.execute(query).all()}


def budget_spend_micro(plan: Plan, used: Usage) -> int:
    """The period's usage ``used`` priced on ``plan`` (the current one), micro-cents: what the budget is
    enforced on."""
    return usage_cost_micro(plan, used)


def billed_spend_micro(catalog: PlanCatalog, by_plan: Mapping[str, Usage], current_plan: str) -> int:
    """Each plan's usage priced on that plan, micro-cents: what the invoice charges for usage. A row with no plan
    recorded, or one the catalog no longer has, is priced on ``current_plan``."""
    return sum(usage_cost_micro(catalog.get(plan if plan in catalog else current_plan), used)
               for plan, used in by_plan.items())
