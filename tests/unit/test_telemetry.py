"""Telemetry on an injected registry: values read back, label caps and normalisation, multiprocess aggregation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from modelmeter.billing.catalog import PlanCatalog
from modelmeter.billing.economics import (
    ComputePrices,
    EconomicsRow,
    Tally,
    UnitEconomics,
    group,
    units_to_cents,
    units_to_decimal_cents,
)
from modelmeter.billing.ledger import UsageRecord
from modelmeter.billing.pricing import Usage
from modelmeter.gateway.collectors import quota_utilisation
from modelmeter.telemetry import OTHER, LabelCap, Telemetry
from modelmeter.tenancy.tenants import Tenant


def record(tenant: str, model: str = "m1", tokens: int = 10, compute_us: int = 0, device: str = "cpu") -> UsageRecord:
    return UsageRecord(request_id=f"req_{tenant}_{tokens}", tenant_id=tenant, model_id=model, created=0,
                       tokens=tokens, compute_us=compute_us, device=device)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_label_cap_keeps_the_first_values_and_folds_the_rest() -> None:
    cap = LabelCap(2)
    assert [cap(v) for v in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    assert LabelCap(0)("a") == OTHER


def test_committed_usage_counts_tokens_requests_and_compute(registry: CollectorRegistry) -> None:
    telemetry = Telemetry(registry)
    telemetry.on_commit([record("ten_a", tokens=7, compute_us=1_500_000), record("ten_a", tokens=5),
                         record("ten_b", model="m2", tokens=3, device="cuda")])
    value = registry.get_sample_value
    assert value("modelmeter_billable_tokens_total", {"tenant": "ten_a", "model": "m1"}) == 12
    assert value("modelmeter_billable_requests_total", {"tenant": "ten_a", "model": "m1"}) == 2
    assert value("modelmeter_billable_tokens_total", {"tenant": "ten_b", "model": "m2"}) == 3
    assert value("modelmeter_compute_seconds_total", {"tenant": "ten_a", "model": "m1", "device": "cpu"}) == 1.5
    assert value("modelmeter_compute_seconds_total", {"tenant": "ten_b", "model": "m2", "device": "cuda"}) == 0


def test_tenant_label_is_capped(registry: CollectorRegistry) -> None:
    telemetry = Telemetry(registry, max_tenants=2)
    telemetry.on_commit([record(f"ten_{i}", tokens=i + 1) for i in range(5)])
    value = registry.get_sample_value
    assert value("modelmeter_billable_tokens_total", {"tenant": "ten_0", "model": "m1"}) == 1
    assert value("modelmeter_billable_tokens_total", {"tenant": "ten_1", "model": "m1"}) == 2
    assert value("modelmeter_billable_tokens_total", {"tenant": OTHER, "model": "m1"}) == 3 + 4 + 5
    assert value("modelmeter_billable_tokens_total", {"tenant": "ten_4", "model": "m1"}) is None
    telemetry.rate_limited("ten_3", "requests")
    assert value("modelmeter_rate_limit_refusals_total", {"tenant": OTHER, "reason": "requests"}) == 1


def test_http_labels_are_normalised(registry: CollectorRegistry) -> None:
    telemetry = Telemetry(registry)
    telemetry.observe_http(route="/v1/classify", method="POST", status=200, model="m1", seconds=0.01)
    telemetry.observe_http(route="unmatched", method="BREW", status=405, model=None, seconds=0.001)
    value = registry.get_sample_value
    assert value("modelmeter_http_requests_total",
                 {"route": "/v1/classify", "method": "POST", "status": "200", "model": "m1"}) == 1
    assert value("modelmeter_http_requests_total",
                 {"route": "unmatched", "method": "other", "status": "405", "model": "none"}) == 1
    assert value("modelmeter_http_request_duration_seconds_count", {"route": "/v1/classify", "method": "POST"}) == 1
    telemetry.rate_limited("ten_a", "free text from somewhere")
    assert value("modelmeter_rate_limit_refusals_total", {"tenant": "ten_a", "reason": OTHER}) == 1


def test_batch_hook_observes_size_padding_and_tokens(registry: CollectorRegistry) -> None:
    telemetry = Telemetry(registry)
    hook = telemetry.batch_hook("m1")
    hook(4, 30, 40, 0.002, 0.05)
    hook(1, 8, 8, 0.0, 0.01)
    value = registry.get_sample_value
    assert value("modelmeter_batch_size_count", {"model": "m1"}) == 2
    assert value("modelmeter_batch_size_sum", {"model": "m1"}) == 5
    assert value("modelmeter_batch_padding_ratio_sum", {"model": "m1"}) == pytest.approx(0.25)
    assert value("modelmeter_batch_padding_ratio_bucket", {"model": "m1", "le": "0.0"}) == 1
    assert value("modelmeter_batch_tokens_total", {"model": "m1", "kind": "real"}) == 38
    assert value("modelmeter_batch_tokens_total", {"model": "m1", "kind": "padding"}) == 10
    assert value("modelmeter_batch_forward_seconds_sum", {"model": "m1"}) == pytest.approx(0.06)


def test_pool_hooks_count_loads_and_evictions(registry: CollectorRegistry) -> None:
    telemetry = Telemetry(registry)
    telemetry.on_load("m1", 0.3)
    telemetry.on_load("m2", 0.2)
    telemetry.on_evict("m1")
    value = registry.get_sample_value
    assert value("modelmeter_model_loads_total", {"model": "m1"}) == 1
    assert value("modelmeter_model_load_seconds_count") == 2
    assert value("modelmeter_model_evictions_total", {"model": "m1"}) == 1
    assert value("modelmeter_queue_capacity_requests", {"model": "m1"}) == 0


def test_registries_are_independent_and_exposition_has_every_family() -> None:
    first, second = Telemetry(CollectorRegistry()), Telemetry(CollectorRegistry())
    first.on_commit([record("ten_a")])
    assert second.registry.get_sample_value("modelmeter_billable_tokens_total", {"tenant": "ten_a", "model": "m1"}) \
        is None
    text = second.exposition().decode()
    for name in ("modelmeter_http_requests_total", "modelmeter_billable_tokens_total", "modelmeter_queue_depth",
                 "modelmeter_pool_bytes", "modelmeter_quota_refusals_total", "process_resident_memory_bytes"):
        assert f"# TYPE {name} " in text


def test_quota_utilisation_only_for_capped_tenants() -> None:
    catalog = PlanCatalog.load()
    free = _tenant("ten_f", "free")
    assert quota_utilisation(catalog, free, Usage(requests=250, tokens=50_000)) == {"requests": 0.25, "tokens": 0.5}
    assert quota_utilisation(catalog, _tenant("ten_p", "payg"), Usage(tokens=10**6)) == {}
    # payg: 1000 requests at $0.0005 and 100k tokens at $0.02/1k = 50 + 200 cents of a 1000-cent budget.
    budgeted = _tenant("ten_b", "payg", monthly_budget_cents=1000)
    assert quota_utilisation(catalog, budgeted, Usage(requests=1000, tokens=100_000)) == {"budget": 0.25}
    assert quota_utilisation(catalog, _tenant("ten_z", "payg", monthly_budget_cents=0), Usage()) == {"budget": 1.0}


def test_compute_prices_are_exact_integers() -> None:
    prices = ComputePrices.parse(cpu_core_hour="0.05", gpu_hour="2.50", cores=4)
    assert (prices.cpu_core_hour_micro, prices.gpu_hour_micro) == (5_000_000, 250_000_000)
    hour_us = 3_600_000_000
    assert units_to_cents(prices.cost_units("cpu", hour_us)) == 20  # 4 cores x 5 cents
    assert units_to_cents(prices.cost_units("cuda", hour_us // 2)) == 125
    # 1 s of one GPU at $2.50/h = 0.069444… cents: rounds to 0 cents, kept exactly to the micro-cent.
    assert units_to_cents(prices.cost_units("cuda", 1_000_000)) == 0
    assert units_to_decimal_cents(prices.cost_units("cuda", 1_000_000)) == "0.069444"
    assert units_to_cents(prices.cost_units("cuda", 7_200_000)) == 1  # exactly 0.5 cents rounds half-up
    assert units_to_cents(prices.cost_units("cuda", 7_199_999)) == 0
    with pytest.raises(ValueError, match="is not a whole number of micro-cents"):
        ComputePrices.parse(cpu_core_hour="0.0000000001", gpu_hour="1", cores=1)


def test_grouping_sums_exactly_and_computes_the_margin() -> None:
    unit = 3_600_000_000 * 1_000_000  # one cent in cost units
    rows = [EconomicsRow("2026-10", "usd", "ten_a", "payg", 500, "invoice", Tally(tokens=10, cost_units=unit * 100)),
            EconomicsRow("2026-10", "usd", "ten_a", "pro", 4900, "invoice", Tally(tokens=5, cost_units=unit * 900)),
            EconomicsRow("2026-10", "usd", "ten_b", "pro", 0, "preview", Tally(tokens=1, cost_units=unit // 2))]
    by_tenant = {r.tenant_id: r for r in group(rows, "tenant")}
    assert UnitEconomics.of(by_tenant["ten_a"]).plans == ["payg", "pro"]
    assert (by_tenant["ten_a"].revenue_cents, by_tenant["ten_a"].compute_cost_cents) == (5400, 1000)
    assert UnitEconomics.of(by_tenant["ten_a"]).margin_ratio == str(Decimal(4400) / Decimal(5400))[:6]
    assert (by_tenant["ten_b"].margin_cents, by_tenant["ten_b"].margin_ratio()) == (-1, None)
    by_plan = {r.plan: r for r in group(rows, "plan")}
    assert by_plan["pro"].revenue_cents == 4900
    assert by_plan["pro"].usage.tokens == 6
    assert by_plan["pro"].revenue_source == "mixed"


_CHILD = textwrap.dedent("""
    import sys
    from prometheus_client import CollectorRegistry
    from modelmeter.billing.ledger import UsageRecord
    from modelmeter.telemetry import Telemetry, multiprocess_dir_from_env
    telemetry = Telemetry(CollectorRegistry(), multiprocess_dir=multiprocess_dir_from_env())
    tokens = int(sys.argv[1])
    telemetry.on_commit([UsageRecord(request_id="r", tenant_id="ten_a", model_id="m1", created=0, tokens=tokens)])
    telemetry.observe_http(route="/v1/classify", method="POST", status=200, model="m1", seconds=0.01)
    telemetry.pool_models.set(1)
""")


def test_multiprocess_values_of_two_processes_aggregate(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for tokens in (11, 31):
        subprocess.run([sys.executable, "-c", _CHILD, str(tokens)], env=env, check=True, timeout=120)
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    parent = Telemetry(CollectorRegistry(), multiprocess_dir=str(tmp_path))
    exposed = parent.exposition_registry()
    assert exposed.get_sample_value("modelmeter_billable_tokens_total", {"tenant": "ten_a", "model": "m1"}) == 42
    assert exposed.get_sample_value("modelmeter_billable_requests_total", {"tenant": "ten_a", "model": "m1"}) == 2
    assert exposed.get_sample_value("modelmeter_http_request_duration_seconds_count",
                                    {"route": "/v1/classify", "method": "POST"}) == 2
    assert exposed.get_sample_value("modelmeter_pool_models") == 2  # livesum over the two processes


def _tenant(tenant_id: str, plan: str, monthly_budget_cents: int | None = None) -> Tenant:
    return Tenant(id=tenant_id, name=tenant_id, email=f"{tenant_id}@example.com", plan=plan, created=0, updated=0,
                  monthly_budget_cents=monthly_budget_cents)
