"""Batch API pricing: batch usage at the plan's ``batch_discount_percent``, on lines of its own, recomputable by a
client from the plan's JSON; interactive usage takes the allowance and the tiers first."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from modelmeter import money
from modelmeter.billing import pricing
from modelmeter.billing.catalog import Plan, PlanCatalog
from modelmeter.billing.pricing import Line, Usage
from tests.plan_strategies import batch_usages, has_volume_tiers, price_text, tiered_plans, with_batch_discount

CATALOG = PlanCatalog.load()
PRO, PAYG, FREE = CATALOG.get("pro"), CATALOG.get("payg"), CATALOG.get("free")


def make_plan(**fields: Any) -> Plan:
    return Plan.model_validate({"id": "p", "name": "P", "rpm_limit": 60, "tpm_limit": 60_000} | fields)


def half_up(value: Decimal | int) -> int:
    return int(Decimal(value).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def test_packaged_paid_plans_sell_batches_at_half_price() -> None:
    assert {plan.id: plan.batch_discount_percent for plan in CATALOG.all()} == {
        "free": 0, "payg": 50, "pro": 50, "scale": 50}


@pytest.mark.parametrize("value", [-1, 101, "50", 12.5, True])
def test_discount_is_an_integer_percent(value: Any) -> None:
    with pytest.raises(ValidationError):
        make_plan(price_per_1k_tokens="0.0100", batch_discount_percent=value)


def test_a_discount_that_leaves_a_fraction_of_a_micro_cent_is_refused() -> None:
    # 1 micro-cent per request at 50% off would be half a micro-cent: refused at load, not rounded at billing.
    with pytest.raises(ValidationError, match="not a whole number of micro-cents once discounted"):
        make_plan(price_per_request="0.00000001", batch_discount_percent=50)
    assert make_plan(price_per_request="0.00000002", batch_discount_percent=50).batch_discount_percent == 50


def test_volume_tiers_take_no_discount() -> None:
    tiers = {"tiers_mode": "volume", "tiers": [{"up_to": 10, "unit_amount_decimal": "0.0100"},
                                               {"up_to": None, "unit_amount_decimal": "0.0050"}]}
    with pytest.raises(ValidationError, match="volume"):
        make_plan(token_tiers=tiers, batch_discount_percent=50)
    assert make_plan(token_tiers=tiers).batch_discount_percent == 0


def test_interactive_takes_the_allowance_first_then_batch_pays_half() -> None:
    # Pro: 5M tokens included, then 0.0100 $/1k = 1,000 micro-cents a token; batch at 50%: 500.
    usage = Usage(requests=30, tokens=6_000_000, batch_requests=10, batch_tokens=2_000_000)
    lines = {line.code: line for line in pricing.price_usage(PRO, usage)}
    assert lines["tokens"].quantity == 0
    assert lines["tokens"].amount == 0
    assert lines["tokens"].description == "Tokens: 4,000,000 used, 5,000,000 included"
    batch = lines["batch_tokens"]
    assert (batch.quantity, batch.unit_amount_decimal, batch.amount) == (1_000_000, Decimal("0.0005"), 500)
    assert batch.description == "Tokens (batch): 2,000,000 used, 50% batch discount"
    # Pro prices no requests: a zero line all the same, as the interactive requests get (the invoice shows use).
    assert (lines["batch_requests"].quantity, lines["batch_requests"].amount) == (10, 0)
    assert pricing.usage_cost_micro(PRO, usage) == 1_000_000 * 500


def test_payg_batch_lines_for_requests_and_tokens() -> None:
    usage = Usage(requests=100, tokens=10_000, batch_requests=40, batch_tokens=4_000)
    lines = pricing.price_usage(PAYG, usage)
    got = {line.code: (line.quantity, line.unit_amount_decimal, line.amount) for line in lines}
    # payg: 0.0005 $/request = 0.05 c, 0.0200 $/1k tokens = 0.002 c a token; batch halves both.
    assert got["requests"] == (60, Decimal("0.05"), 3)
    assert got["batch_requests"] == (40, Decimal("0.025"), 1)
    assert got["tokens"] == (6_000, Decimal("0.002"), 12)
    assert got["batch_tokens"] == (4_000, Decimal("0.001"), 4)
    assert [line.code for line in lines] == ["requests", "tokens", "batch_requests", "batch_tokens"]


def test_no_batch_usage_no_batch_lines_and_the_same_cost() -> None:
    usage = Usage(requests=7, tokens=70_000)
    assert all(not line.code.startswith("batch_") for line in pricing.price_usage(PAYG, usage))
    batch_free = make_plan(price_per_1k_tokens="0.0200", price_per_request="0.0005")
    assert pricing.usage_cost_micro(PAYG, usage) == pricing.usage_cost_micro(batch_free, usage)


def test_full_discount_makes_batch_free_and_zero_discount_prices_it_like_interactive() -> None:
    usage = Usage(requests=10, tokens=1_000, batch_requests=10, batch_tokens=1_000)
    free = make_plan(price_per_1k_tokens="0.0200", batch_discount_percent=100)
    assert pricing.usage_cost_micro(free, usage) == 0
    full = make_plan(price_per_1k_tokens="0.0200")
    assert pricing.usage_cost_micro(full, usage) == pricing.usage_cost_micro(full, Usage(requests=10, tokens=1_000))


def test_batch_usage_cannot_exceed_the_usage() -> None:
    with pytest.raises(ValueError, match="part of the usage"):
        Usage(requests=1, tokens=10, batch_requests=2)


def test_graduated_tiers_price_the_batch_units_after_the_interactive_ones() -> None:
    plan = make_plan(batch_discount_percent=50, token_tiers={"tiers_mode": "graduated", "tiers": [
        {"up_to": 1_000, "unit_amount_decimal": "0.0200"},
        {"up_to": None, "unit_amount_decimal": "0.0100", "flat_amount_cents": 300}]})
    usage = Usage(requests=2, tokens=1_500, batch_requests=1, batch_tokens=800)
    batch = [line for line in pricing.price_usage(plan, usage) if line.code == "batch_tokens"]
    # Interactive 700 tokens sit in tier 1; the batch's 800 are 300 in tier 1 and 500 in tier 2, which it reached
    # first, so the tier's flat $3.00 is the batch's, discounted too.
    assert [(line.quantity, line.unit_amount_decimal, line.amount) for line in batch] == [
        (300, Decimal("0.001"), 0), (500, Decimal("0.0005"), 0), (1, Decimal("150"), 150)]


# --- properties: a client recomputes every batch line from the plan's JSON ------------------------------------

discounted_plans = with_batch_discount(st.one_of(st.sampled_from(CATALOG.all()), tiered_plans(),
                                                 st.builds(lambda r, t, inc: make_plan(
                                                     price_per_request=price_text(r, 1),
                                                     price_per_1k_tokens=price_text(t, 1_000),
                                                     included_tokens=inc), st.integers(0, 10**7).map(lambda n: n * 2),
                                                     st.integers(0, 10**7).map(lambda n: n * 4),
                                                     st.integers(0, 10**6))))

DIMENSIONS = (("requests", "batch_requests", "price_per_request", "request_tiers", "included_requests", 1),
              ("tokens", "batch_tokens", "price_per_1k_tokens", "token_tiers", "included_tokens", 1_000))


def client_batch_cents(plan_json: dict[str, Any], usage: Usage) -> dict[str, int]:
    """The batch lines' amounts by code, recomputed from the plan's JSON alone: the batch units are those after the
    interactive ones, beyond the allowance, each tier's (or the flat price's) units at the discounted price rounded
    once, a tier first reached by them adding its discounted flat amount as a line of its own."""
    keep = Decimal(100 - plan_json["batch_discount_percent"]) / 100
    out: dict[str, int] = {}
    with localcontext(prec=100):
        for used_field, batch_field, price_field, tiers_field, included_field, per_units in DIMENSIONS:
            batch = getattr(usage, batch_field)
            if not batch:
                continue
            used, included = getattr(usage, used_field), int(plan_json[included_field])
            own_billable, all_billable = max(0, used - batch - included), max(0, used - included)
            tiers = plan_json.get(tiers_field)
            if tiers is None:
                unit = Decimal(plan_json[price_field]) * 100 / per_units * keep
                out[batch_field] = half_up((all_billable - own_billable) * unit)
                continue
            if tiers["tiers_mode"] == "volume":
                continue  # priced on the interactive lines, together
            total, lower = 0, 0
            for i, tier in enumerate(tiers["tiers"]):
                high = tier["up_to"]
                reached_by_all = i == 0 or all_billable > lower
                if not reached_by_all:
                    break
                reached_before = used - batch > 0 and (i == 0 or own_billable > lower)

                def units(billable: int, low: int = lower, up: int | None = high) -> int:
                    return max(0, (billable if up is None else min(billable, up)) - low)

                unit = Decimal(tier["unit_amount_decimal"]) * 100 / per_units * keep
                total += half_up((units(all_billable) - units(own_billable)) * unit)
                if not reached_before:
                    total += half_up(tier["flat_amount_cents"] * keep)
                lower = high if high is not None else lower
            out[batch_field] = total
    return out


@given(discounted_plans, batch_usages(max_requests=10**5, max_tokens=10**8))
def test_batch_lines_match_a_client_recomputation(plan: Plan, usage: Usage) -> None:
    lines = pricing.price_usage(plan, usage)
    batch: dict[str, int] = {}
    for line in lines:
        assert line.amount == half_up(line.quantity * line.unit_amount_decimal)
        if line.code.startswith("batch_"):
            batch[line.code] = batch.get(line.code, 0) + line.amount
    assert batch == client_batch_cents(plan.model_dump(mode="json"), usage)


@given(discounted_plans, batch_usages(max_requests=10**5, max_tokens=10**8))
def test_the_cost_is_interactive_first_and_the_batch_share_discounted(plan: Plan, usage: Usage) -> None:
    """The budget's cost formula, against the undiscounted one (itself tested against clients elsewhere)."""
    keep = 100 - plan.batch_discount_percent
    own = Usage(usage.requests - usage.batch_requests, usage.tokens - usage.batch_tokens, usage.training_tokens)
    whole = Usage(usage.requests, usage.tokens, usage.training_tokens)
    expected = pricing.usage_cost_micro(plan, own)
    expected += (pricing.usage_cost_micro(plan, whole) - pricing.usage_cost_micro(plan, own)) * keep // 100
    assert pricing.usage_cost_micro(plan, usage) == expected
    # Exact: the discounted share is whole micro-cents, so no rounding hides in the budget.
    assert (pricing.usage_cost_micro(plan, whole) - pricing.usage_cost_micro(plan, own)) * keep % 100 == 0
    lines = pricing.price_usage(plan, usage)
    rounded = pricing.subtotal(lines) * money.MICRO_PER_CENT
    assert abs(rounded - pricing.usage_cost_micro(plan, usage)) <= len(lines) * money.MICRO_PER_CENT // 2


@given(discounted_plans, st.lists(batch_usages(max_requests=10**4, max_tokens=10**7), max_size=12))
def test_more_usage_never_costs_less_and_batch_never_more_than_interactive(plan: Plan, steps: list[Usage]) -> None:
    """Usage added, batch or not, never lowers the cost (volume tiers aside), and the same usage served as batch
    lines never costs more than served interactively."""
    total = Usage()
    for step in steps:
        assert pricing.marginal_cost_micro(plan, total, step) >= 0 or has_volume_tiers(plan)
        total = total + step
    interactive = Usage(total.requests, total.tokens, total.training_tokens)
    assert pricing.usage_cost_micro(plan, total) <= pricing.usage_cost_micro(plan, interactive)


def test_lines_are_json_with_their_batch_codes() -> None:
    line = next(line for line in pricing.price_usage(PAYG, Usage(requests=3, tokens=3, batch_requests=3,
                                                                batch_tokens=3)) if line.code == "batch_tokens")
    assert isinstance(line, Line)
    assert line.to_json()["code"] == "batch_tokens"
