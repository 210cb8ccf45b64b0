"""Gauges read from the database when Prometheus scrapes: fine-tuning jobs by state, the Stripe outbox backlog,
usage alert deliveries waiting and given up on, tenants by plan and status, quota utilisation, unit economics
(revenue, compute cost and margin by plan and by tenant) for the running month, and the prepaid credits tenants
hold.

:func:`~modelmeter.gateway.routes.metrics.instrument` adds a :class:`DatabaseCollector` to the app's
:class:`~modelmeter.telemetry.Telemetry` with ``add_scrape_collector``; in multiprocess mode it is exposed once,
beside the aggregated per-process values. Labels follow :mod:`modelmeter.telemetry`'s rules: ``tenant`` is a
tenant id (the top tenants, up to the tenant cap; outstanding credits fold the rest into ``other``, so the
series still add up to everything held), ``plan`` a catalog plan or ``other``, ``state``, ``status``
and ``resource`` small fixed sets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from modelmeter import clock
from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.credits import outstanding_by_tenant
from modelmeter.billing.economics import ComputePrices, EconomicsRow, group, period_economics
from modelmeter.billing.periods import period_of
from modelmeter.billing.pricing import Usage
from modelmeter.billing.spend import budget_spend_micro
from modelmeter.billing.tables import AlertDelivery, StripeOutbox
from modelmeter.models.finetune.tables import ACTIVE_STATUSES, FINISHED_STATUSES, FineTuningJob
from modelmeter.money import MICRO_PER_CENT
from modelmeter.telemetry import OTHER
from modelmeter.tenancy.tenants import Tenant

log = logging.getLogger("modelmeter.telemetry")  # the logger these messages have always gone to


def outbox_backlog(*, session: Session) -> tuple[int, int, int | None]:
    """Stripe outbox rows waiting (``pending``), given up (``failed``), and the oldest waiting row's ``created``."""
    query = (select(StripeOutbox.status, func.count(), func.min(StripeOutbox.created))
             .where(col(StripeOutbox.status).in_(("pending", "failed"))).group_by(col(StripeOutbox.status)))
    found = {status: (int(count), oldest) for status, count, oldest in session.exec(query).all()}
    pending, oldest = found.get("pending", (0, None))
    return pending, found.get("failed", (0, None))[0], oldest


def jobs_by_state(*, session: Session) -> dict[str, int]:
    """Fine-tuning jobs per state (every state listed, zero included)."""
    counts = dict.fromkeys((*ACTIVE_STATUSES, *FINISHED_STATUSES), 0)
    query = select(FineTuningJob.status, func.count()).group_by(col(FineTuningJob.status))
    for status, count in session.exec(query).all():
        counts[status] = int(count)
    return counts


def quota_utilisation(catalog: PlanCatalog, tenant: Tenant, used: Usage) -> dict[str, float]:
    """How much of each cap a tenant has used this period (1.0 = exhausted); only capped resources."""
    plan = catalog.get(tenant.plan) if tenant.plan in catalog else None
    out: dict[str, float] = {}
    if plan is not None and plan.hard_limit:
        for resource, cap, value in (("requests", plan.included_requests, used.requests),
                                     ("tokens", plan.included_tokens, used.tokens)):
            out[resource] = float(Fraction(value, cap)) if cap else 1.0
    if plan is not None and tenant.monthly_budget_cents is not None:
        spent = Fraction(budget_spend_micro(plan, used), MICRO_PER_CENT)
        budget = tenant.monthly_budget_cents
        out["budget"] = float(spent / budget) if budget else 1.0
    return out


class _Families:
    """The metric families one scrape of the database yields."""

    def __init__(self) -> None:
        g = GaugeMetricFamily
        self.up = g("modelmeter_metrics_database_up", "1 when the last scrape could read the database.")
        self.jobs = g("modelmeter_fine_tuning_jobs", "Fine-tuning jobs by state.", labels=["state"])
        self.outbox = g("modelmeter_stripe_outbox_pending", "Stripe outbox rows waiting to be sent to Stripe.")
        self.outbox_failed = g("modelmeter_stripe_outbox_failed", "Stripe outbox rows given up on (need "
                               "`modelmeter billing sync --retry-failed`).")
        self.outbox_age = g("modelmeter_stripe_outbox_oldest_pending_age_seconds", "Age of the oldest waiting "
                            "Stripe outbox row (0 when none waits).")
        self.alerts_pending = g("modelmeter_alert_deliveries_pending", "Usage alert deliveries waiting to be "
                                "sent (or retried) to tenants' URLs.")
        self.alerts_failed = g("modelmeter_alert_deliveries_failed", "Usage alert deliveries given up on after "
                               "the maximum attempts (listed by GET /admin/events/deliveries?status=failed).")
        self.quota = g("modelmeter_tenant_quota_utilisation_ratio", "Share of a capped tenant's monthly allowance "
                       "or budget used this period (the most used tenants, up to the tenant cap).",
                       labels=["tenant", "resource"])
        self.tenants = g("modelmeter_tenants", "Tenants by plan and status.", labels=["plan", "status"])
        labels = ["plan"]
        self.plan_revenue = g("modelmeter_plan_revenue_cents", "Revenue this period by plan (invoice preview).",
                              labels=labels)
        self.plan_cost = g("modelmeter_plan_compute_cost_cents", "Compute cost this period by plan.", labels=labels)
        self.plan_margin = g("modelmeter_plan_margin_cents", "Revenue minus compute cost this period by plan.",
                             labels=labels)
        labels = ["tenant"]
        self.tenant_revenue = g("modelmeter_tenant_revenue_cents", "Revenue this period by tenant (the top "
                                "tenants by revenue, up to the tenant cap).", labels=labels)
        self.tenant_cost = g("modelmeter_tenant_compute_cost_cents", "Compute cost this period by tenant.",
                             labels=labels)
        self.tenant_margin = g("modelmeter_tenant_margin_cents", "Revenue minus compute cost this period by tenant.",
                               labels=labels)
        self.credits = g("modelmeter_credits_outstanding_cents", "Prepaid credits tenants hold, unexpired and not "
                         "yet drawn, per the ledger (the largest balances up to the tenant cap, the rest as 'other').",
                         labels=labels)

    def all(self) -> list[Metric]:
        return [m for m in vars(self).values() if isinstance(m, Metric)]


class DatabaseCollector(Collector):
    """Gauges read from the database when Prometheus scrapes, cached for ``ttl_s`` seconds.

    Every replica exports the same values (they come from the shared database): aggregate them with ``max``.
    """

    def __init__(self, *, sessions: sessionmaker[Session], catalog: PlanCatalog, prices: ComputePrices,
                 tenants: Callable[[Session], Sequence[Tenant]], max_tenants: int, ttl_s: float) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._prices = prices
        self._tenants = tenants
        self._max_tenants = max_tenants
        self._ttl = ttl_s
        self._cache: list[Metric] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._cache is None or time.monotonic() - self._at >= self._ttl:
                self._cache = self._gather()
                self._at = time.monotonic()
            return list(self._cache)

    def _gather(self) -> list[Metric]:
        families = _Families()
        try:
            with self._sessions() as session:
                self._fill(session, families)
            with self._sessions() as session:
                self._outbox(session, families)
            families.up.add_metric([], 1)
        except Exception:
            log.warning("metrics: reading the database failed", exc_info=True)
            families.up.add_metric([], 0)
        return families.all()

    def _fill(self, session: Session, f: _Families) -> None:
        for state, count in jobs_by_state(session=session).items():
            f.jobs.add_metric([state], count)
        tenants = list(self._tenants(session))
        self._tenant_counts(tenants, f)
        rows = period_economics(session=session, catalog=self._catalog, prices=self._prices,
                                period=period_of(clock.now_s()), tenants=tenants)
        self._economics(rows, f)
        self._quota(tenants, rows, f)
        self._credits(outstanding_by_tenant(session=session), f)

    def _outbox(self, session: Session, f: _Families) -> None:
        pending, failed, oldest = outbox_backlog(session=session)
        f.outbox.add_metric([], pending)
        f.outbox_failed.add_metric([], failed)
        f.outbox_age.add_metric([], max(0, clock.now_s() - oldest) if oldest is not None else 0)
        deliveries = dict(session.exec(
            select(AlertDelivery.status, func.count()).where(col(AlertDelivery.status).in_(("pending", "failed")))
            .group_by(col(AlertDelivery.status))).all())
        f.alerts_pending.add_metric([], deliveries.get("pending", 0))
        f.alerts_failed.add_metric([], deliveries.get("failed", 0))

    def _tenant_counts(self, tenants: Sequence[Tenant], f: _Families) -> None:
        counts: dict[tuple[str, str], int] = {}
        for t in tenants:
            key = (t.plan if t.plan in self._catalog else OTHER, t.status)
            counts[key] = counts.get(key, 0) + 1
        for (plan, status), count in sorted(counts.items()):
            f.tenants.add_metric([plan, status], count)

    def _economics(self, rows: list[EconomicsRow], f: _Families) -> None:
        for row in group(rows, "plan"):
            plan = [row.plan or OTHER]
            f.plan_revenue.add_metric(plan, row.revenue_cents)
            f.plan_cost.add_metric(plan, row.compute_cost_cents)
            f.plan_margin.add_metric(plan, row.margin_cents)
        per_tenant = sorted(group(rows, "tenant"), key=lambda r: (-r.revenue_cents, r.tenant_id or ""))
        for row in per_tenant[: self._max_tenants]:
            tenant = [row.tenant_id or OTHER]
            f.tenant_revenue.add_metric(tenant, row.revenue_cents)
            f.tenant_cost.add_metric(tenant, row.compute_cost_cents)
            f.tenant_margin.add_metric(tenant, row.margin_cents)

    def _quota(self, tenants: Sequence[Tenant], rows: list[EconomicsRow], f: _Families) -> None:
        used = {r.tenant_id: r.usage for r in group(rows, "tenant")}
        ratios: dict[str, dict[str, float]] = {}
        for tenant in tenants:
            tally = used.get(tenant.id)
            usage = Usage(tally.requests, tally.tokens, tally.training_tokens, tally.batch_requests,
                          tally.batch_tokens) if tally else Usage()
            ratios[tenant.id] = quota_utilisation(self._catalog, tenant, usage)
        capped = [t for t in ratios if ratios[t]]
        top = sorted(capped, key=lambda t: (-max(ratios[t].values()), t))[: self._max_tenants]
        for tenant_id in top:
            for resource, ratio in ratios[tenant_id].items():
                f.quota.add_metric([tenant_id, resource], ratio)

    def _credits(self, outstanding: dict[str, int], f: _Families) -> None:
        ranked = sorted(outstanding.items(), key=lambda item: (-item[1], item[0]))
        for tenant_id, cents in ranked[: self._max_tenants]:
            f.credits.add_metric([tenant_id], cents)
        rest = ranked[self._max_tenants:]
        if rest:
            f.credits.add_metric([OTHER], sum(cents for _, cents in rest))
