"""Pricing: exact amounts to the cent for every packaged plan and charge, half-up rounding, proration,
plan changes, and properties checked against a client that recomputes lines from the plan's JSON."""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from modelmeter import money
from modelmeter.billing import pricing
from modelmeter.billing.catalog import PRICES, Plan, PlanCatalog
from modelmeter.billing.pricing import Line, Usage
from tests.plan_strategies import has_volume_tiers, tiered_plans

CATALOG = PlanCatalog.load()
FREE, PAYG, PRO = CATALOG.get("free"), CATALOG.get("payg"), CATALOG.get("pro")
MONTH = 30 * 86_400
DAY = 86_400


def make_plan(**fields: Any) -> Plan:
    return Plan.model_validate({"id": "test", "name": "Test", "rpm_limit": 60, "tpm_limit": 60_000, **fields})


HALF_CENT = make_plan(price_per_request="0.005", price_per_1k_tokens="0.005", price_per_1m_training_tokens="0.01")


def line_for(plan: Plan, usage: Usage, code: str) -> Line | None:
    return next((line for line in pricing.price_usage(plan, usage) if line.code == code), None)


# ---------------------------------------------------------------- helpers and unit prices


@pytest.mark.parametrize(("numerator", "denominator", "expected"), [
    (0, 7, 0), (1, 2, 1), (3, 2, 2), (5, 2, 3), (4, 2, 2), (2_469_134, 1_000, 2469), (2_469_500, 1_000, 2470),
    (2_469_499, 1_000, 2469), (10**30 + 5, 10, 10**29 + 1),
])
def test_round_half_up_div(numerator: int, denominator: int, expected: int) -> None:
    assert money.round_half_up_div(numerator, denominator) == expected


@pytest.mark.parametrize(("numerator", "denominator"), [(-1, 2), (1, 0), (1, -2)])
def test_round_half_up_div_refuses_negatives(numerator: int, denominator: int) -> None:
    with pytest.raises(ValueError, match="needs numerator >= 0 and denominator > 0"):
        money.round_half_up_div(numerator, denominator)


@pytest.mark.parametrize(("price", "per_units", "micro"), [
    ("0.0200", 1_000, 2_000), ("0.0100", 1_000, 1_000), ("0.0005", 1, 50_000), ("2.0000", 1_000_000, 200),
    ("1.5000", 1_000_000, 150), ("0", 1, 0), ("0.00000001", 1, 1), ("0.00001", 1_000, 1), ("0.01", 1_000_000, 1),
    ("12.5", 1, 1_250_000_000),
])
def test_unit_micro_cents_exact(price: str, per_units: int, micro: int) -> None:
    assert money.unit_micro_cents(Decimal(price), per_units) == micro


INEXACT, INVALID = "is not a whole number of micro-cents", "must be finite and non-negative"


@pytest.mark.parametrize(("price", "per_units", "message"), [
    ("0.000000001", 1, INEXACT), ("0.000001", 1_000, INEXACT), ("0.001", 1_000_000, INEXACT),
    ("-0.01", 1, INVALID), ("NaN", 1, INVALID), ("Infinity", 1, INVALID),
    ("0.01", 0, "per_units must be positive"),
])
def test_unit_micro_cents_refuses_inexact_or_invalid(price: str, per_units: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        money.unit_micro_cents(Decimal(price), per_units)


# ---------------------------------------------------------------- metered charges, packaged catalog

METERED_TABLE = [
    # plan, usage, code, quantity, unit_amount_decimal (cents), amount (cents)
    (PAYG, Usage(tokens=1_234_567), "tokens", 1_234_567, "0.002", 2469),  # 2469.134
    (PAYG, Usage(tokens=249), "tokens", 249, "0.002", 0),  # 0.498
    (PAYG, Usage(tokens=250), "tokens", 250, "0.002", 1),  # 0.5 -> up
    (PAYG, Usage(tokens=1_250), "tokens", 1_250, "0.002", 3),  # 2.5 -> up (banker's would give 2)
    (PAYG, Usage(requests=1), "requests", 1, "0.05", 0),  # 0.05
    (PAYG, Usage(requests=10), "requests", 10, "0.05", 1),  # 0.5 -> up
    (PAYG, Usage(requests=50), "requests", 50, "0.05", 3),  # 2.5 -> up
    (PAYG, Usage(requests=1_000_000), "requests", 1_000_000, "0.05", 50_000),
    (PAYG, Usage(training_tokens=1_000_000), "training_tokens", 1_000_000, "0.0002", 200),
    (PAYG, Usage(training_tokens=2_500), "training_tokens", 2_500, "0.0002", 1),  # 0.5 -> up
    (PAYG, Usage(training_tokens=12_345_678), "training_tokens", 12_345_678, "0.0002", 2469),  # 2469.1356
    (PRO, Usage(tokens=4_999_999), "tokens", 0, "0.001", 0),
    (PRO, Usage(tokens=5_000_000), "tokens", 0, "0.001", 0),
    (PRO, Usage(tokens=5_000_499), "tokens", 499, "0.001", 0),  # 0.499
    (PRO, Usage(tokens=5_000_500), "tokens", 500, "0.001", 1),  # 0.5 -> up
    (PRO, Usage(tokens=5_432_100), "tokens", 432_100, "0.001", 432),  # 432.1
    (PRO, Usage(tokens=6_000_000), "tokens", 1_000_000, "0.001", 1000),
    (PRO, Usage(requests=7), "requests", 7, "0", 0),  # no per-request price on pro
    (PRO, Usage(training_tokens=10_000_000), "training_tokens", 0, "0.00015", 0),
    (PRO, Usage(training_tokens=10_010_000), "training_tokens", 10_000, "0.00015", 2),  # 1.5 -> up
    (PRO, Usage(training_tokens=12_000_000), "training_tokens", 2_000_000, "0.00015", 300),
    (FREE, Usage(tokens=100_000), "tokens", 0, "0", 0),
    (FREE, Usage(tokens=100_001), "tokens", 1, "0", 0),
    (FREE, Usage(requests=1_000), "requests", 0, "0", 0),
    (FREE, Usage(training_tokens=200_000), "training_tokens", 0, "0", 0),
    (HALF_CENT, Usage(requests=1), "requests", 1, "0.5", 1),
    (HALF_CENT, Usage(requests=3), "requests", 3, "0.5", 2),
    (HALF_CENT, Usage(requests=5), "requests", 5, "0.5", 3),
    (HALF_CENT, Usage(tokens=1_000), "tokens", 1_000, "0.0005", 1),
    (HALF_CENT, Usage(training_tokens=500_000), "training_tokens", 500_000, "0.000001", 1),
]


@pytest.mark.parametrize(("plan", "usage", "code", "quantity", "unit", "amount"), METERED_TABLE)
def test_metered_amounts_exact(plan: Plan, usage: Usage, code: str, quantity: int, unit: str, amount: int) -> None:
    line = line_for(plan, usage, code)
    assert line is not None
    assert (line.quantity, line.amount, line.plan) == (quantity, amount, plan.id)
    assert line.unit_amount_decimal == Decimal(unit)
    assert str(line.unit_amount_decimal) == unit or format(line.unit_amount_decimal, "f") == unit


def test_a_line_per_used_charge_only() -> None:
    assert pricing.price_usage(PAYG, Usage()) == []
    assert [line.code for line in pricing.price_usage(PAYG, Usage(tokens=5))] == ["tokens"]
    codes = [line.code for line in pricing.price_usage(FREE, Usage(1, 2, 3))]
    assert codes == ["requests", "tokens", "training_tokens"]


def test_descriptions_show_used_and_included() -> None:
    pro = line_for(PRO, Usage(tokens=5_432_100), "tokens")
    payg = line_for(PAYG, Usage(requests=1_234), "requests")
    assert pro is not None
    assert pro.description == "Tokens: 5,432,100 used, 5,000,000 included"
    assert payg is not None
    assert payg.description == "Requests: 1,234 used"


def test_free_plan_within_allowance_costs_nothing() -> None:
    usage = Usage(requests=1_000, tokens=100_000, training_tokens=200_000)
    lines = pricing.price_period([(FREE, MONTH, usage)], seconds_in_period=MONTH)
    assert pricing.subtotal(lines) == 0
    assert pricing.usage_cost_micro(FREE, usage) == 0
    assert [line.quantity for line in lines] == [0, 0, 0]


def test_metered_validates_inputs() -> None:
    with pytest.raises(ValueError, match="unknown metered charge 'base_fee'"):
        pricing.metered(PAYG, code="base_fee", used=1, included=0, unit_micro=1, label="x")
    with pytest.raises(ValueError, match="used must be a non-negative integer"):
        pricing.metered(PAYG, code="tokens", used=-1, included=0, unit_micro=1, label="x")


# ---------------------------------------------------------------- base fee and proration


@pytest.mark.parametrize(("plan", "seconds", "period", "amount", "unit", "description"), [
    (PRO, MONTH, MONTH, 4900, "4900", "Pro plan base fee"),
    (PRO, 15 * DAY, MONTH, 2450, "2450", "Pro plan base fee (15.0 of 30 days)"),
    (PRO, 10 * DAY, 31 * DAY, 1581, "1580.645161290323", "Pro plan base fee (10.0 of 31 days)"),  # 1580.645...
    (PRO, 1, MONTH, 0, "0.001890432099", "Pro plan base fee (<0.1 of 30 days)"),
    (PRO, 12 * 3600, MONTH, 82, "81.666666666667", "Pro plan base fee (0.5 of 30 days)"),  # 81.67
    (make_plan(base_fee_cents=1), MONTH // 2, MONTH, 1, "0.5", "Test plan base fee (15.0 of 30 days)"),  # 0.5 -> up
    (make_plan(base_fee_cents=3), MONTH // 2, MONTH, 2, "1.5", "Test plan base fee (15.0 of 30 days)"),  # 1.5 -> up
])
def test_base_fee_prorated(plan: Plan, seconds: int, period: int, amount: int, unit: str, description: str) -> None:
    line = pricing.base_fee(plan, seconds_on_plan=seconds, seconds_in_period=period)
    assert line is not None
    assert (line.code, line.quantity, line.amount, line.description) == ("base_fee", 1, amount, description)
    assert line.unit_amount_decimal == Decimal(unit)
    assert format(line.unit_amount_decimal, "f") == unit


def test_no_base_fee_line_without_fee_or_time() -> None:
    assert pricing.base_fee(PAYG, seconds_on_plan=MONTH, seconds_in_period=MONTH) is None
    assert pricing.base_fee(FREE, seconds_on_plan=MONTH, seconds_in_period=MONTH) is None
    assert pricing.base_fee(PRO, seconds_on_plan=0, seconds_in_period=MONTH) is None


@pytest.mark.parametrize(("seconds", "period"), [(-1, MONTH), (MONTH + 1, MONTH), (0, 0)])
def test_base_fee_refuses_bad_periods(seconds: int, period: int) -> None:
    with pytest.raises(ValueError, match="need 0 <= seconds_on_plan <= seconds_in_period"):
        pricing.base_fee(PRO, seconds_on_plan=seconds, seconds_in_period=period)


# ---------------------------------------------------------------- plan changes within a period


def test_mid_period_upgrade_prices_usage_by_the_plan_in_force() -> None:
    lines = pricing.price_period(
        [(PAYG, 10 * DAY, Usage(requests=100, tokens=1_000_000)), (PRO, 20 * DAY, Usage(tokens=6_000_000))],
        seconds_in_period=MONTH,
    )
    summary = [(line.plan, line.code, line.quantity, line.amount) for line in lines]
    assert summary == [
        ("payg", "requests", 100, 5),  # 5.0
        ("payg", "tokens", 1_000_000, 2000),
        ("pro", "base_fee", 1, 3267),  # 4900 * 20/30 = 3266.67
        ("pro", "tokens", 1_000_000, 1000),  # full 5M allowance, not prorated
    ]
    assert pricing.subtotal(lines) == 6272


def test_segments_on_the_same_plan_share_one_allowance_and_one_rounding() -> None:
    split = pricing.price_period(
        [(PRO, 10 * DAY, Usage(tokens=3_000_000)), (PAYG, 10 * DAY, Usage()), (PRO, 10 * DAY, Usage(tokens=3_000_000))],
        seconds_in_period=MONTH,
    )
    merged = pricing.price_period([(PRO, 20 * DAY, Usage(tokens=6_000_000))], seconds_in_period=MONTH)
    assert split == merged


def test_segments_must_fit_in_the_period() -> None:
    with pytest.raises(ValueError, match="fit in the period"):
        pricing.price_period([(PRO, 20 * DAY, Usage()), (PAYG, 11 * DAY, Usage())], seconds_in_period=MONTH)
    with pytest.raises(ValueError, match="segment seconds must be non-negative"):
        pricing.price_period([(PRO, -1, Usage())], seconds_in_period=MONTH)


def test_factory_has_one_model_per_line_code() -> None:
    assert tuple(pricing.CHARGE_MODELS) == pricing.LINE_CODES
    segment = pricing.Segment(MONTH, MONTH, Usage(tokens=1_234_567))
    assert pricing.charge_model("base_fee")(PRO, segment) == [pricing.base_fee(
        PRO, seconds_on_plan=MONTH, seconds_in_period=MONTH)]
    assert pricing.charge_model("tokens")(PAYG, segment) == [line_for(PAYG, segment.usage, "tokens")]
    with pytest.raises(ValueError, match="unknown charge 'storage'"):
        pricing.charge_model("storage")


def test_usage_values() -> None:
    assert Usage(1, 2, 3) + Usage(10, 20, 30) == Usage(11, 22, 33)
    for bad in ({"tokens": -1}, {"requests": True}, {"training_tokens": Decimal("1.5")}):
        with pytest.raises(ValueError, match="must be a non-negative integer"):
            Usage(**bad)


def test_line_json_is_plain() -> None:
    line = pricing.base_fee(make_plan(base_fee_cents=1), seconds_on_plan=1, seconds_in_period=31 * DAY)
    assert line is not None
    assert line.to_json() == {"code": "base_fee", "description": "Test plan base fee (<0.1 of 31 days)",
                              "quantity": 1, "unit_amount_decimal": "0.000000373357", "amount": 0, "plan": "test"}


def test_pricing_module_has_no_floats() -> None:
    source = Path(pricing.__file__).read_text()
    assert not re.search(r"float\(|:\s*float\b|->\s*float\b", source)


# ---------------------------------------------------------------- properties

PRICE_FIELDS = {  # what a client knows from the docs: price field -> (units priced, allowance field, usage field)
    "price_per_request": (1, "included_requests", "requests"),
    "price_per_1k_tokens": (1_000, "included_tokens", "tokens"),
    "price_per_1m_training_tokens": (1_000_000, "included_training_tokens", "training_tokens"),
}


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """The packaged plans, or a random plan whose prices are whole micro-cents per unit, flat or in tiers."""
    kind = draw(st.sampled_from(["catalog", "flat", "tiered"]))
    if kind == "catalog":
        return draw(st.sampled_from(CATALOG.all()))
    if kind == "tiered":
        return draw(tiered_plans())
    micro = st.integers(min_value=0, max_value=10**7)
    fields: dict[str, Any] = {  # micro-cents per unit -> major units per `per_units` units
        name: format(Decimal(draw(micro) * per_units).scaleb(-8), "f")
        for name, (per_units, _, _) in PRICE_FIELDS.items()
    }
    for _, included, _ in PRICE_FIELDS.values():
        fields[included] = draw(st.integers(min_value=0, max_value=10**6))
    return make_plan(base_fee_cents=draw(st.integers(min_value=0, max_value=10**6)), **fields)


requests_tokens = st.lists(st.integers(min_value=1, max_value=512 * 64), max_size=50)
training_runs = st.lists(st.integers(min_value=0, max_value=10**8), max_size=5)
usages = st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**9), st.integers(0, 10**9))


TIER_FIELDS = {"request_tiers": "price_per_request", "token_tiers": "price_per_1k_tokens"}


def client_tiered_cents(tiers: dict[str, Any], billable: int, per_units: int) -> int:
    """A client's reading of Stripe-style tiers from the JSON: cents, each tier's units rounded once, plus flats."""
    rows, lower = [], 0  # (first unit - 1, last unit or None, cents per unit, flat cents)
    for tier in tiers["tiers"]:
        rows.append((lower, tier["up_to"], Decimal(tier["unit_amount_decimal"]) * 100 / per_units,
                     tier["flat_amount_cents"]))
        lower = tier["up_to"] if tier["up_to"] is not None else lower
    if tiers["tiers_mode"] == "volume":
        _, _, unit, flat = next(row for row in rows if row[1] is None or billable <= row[1])
        return half_up(billable * unit) + int(flat)
    total = 0
    for i, (low, high, unit, flat) in enumerate(rows):
        if i and billable <= low:
            break
        units = (billable if high is None else min(billable, high)) - low
        total += half_up(units * unit) + int(flat)
    return total


def half_up(value: Decimal | int) -> int:
    return int(Decimal(value).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def client_amounts(plan_json: dict[str, Any], usage: Usage) -> dict[str, int]:
    """A client's recomputation from the plan's JSON: usage beyond the allowance, priced once, half-up (per tier
    reached when the plan shows tiers instead of the flat price)."""
    amounts = {}
    with localcontext(prec=100):
        for field, (per_units, included, used_field) in PRICE_FIELDS.items():
            used = getattr(usage, used_field)
            billable = max(0, used - int(plan_json[included]))
            tiers = next((plan_json[t] for t, f in TIER_FIELDS.items() if f == field and t in plan_json), None)
            if used and tiers is not None:
                assert field not in plan_json  # a tiered dimension shows no flat price
                amounts[used_field] = client_tiered_cents(tiers, billable, per_units)
            elif used:
                exact = Decimal(billable) * Decimal(plan_json[field]) * 100 / per_units
                amounts[used_field] = half_up(exact)
    return amounts


def amounts_by_code(lines: list[Line]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        out[line.code] = out.get(line.code, 0) + line.amount
    return out


@given(plans(), requests_tokens, training_runs)
def test_invoice_matches_client_recomputation(plan: Plan, per_request: list[int], training: list[int]) -> None:
    usage = Usage(requests=len(per_request), tokens=sum(per_request), training_tokens=sum(training))
    lines = pricing.price_usage(plan, usage)
    expected = client_amounts(plan.model_dump(mode="json"), usage)
    assert amounts_by_code(lines) == expected
    assert pricing.subtotal(lines) == sum(expected.values())
    for line in lines:  # each line recomputes from its own quantity and unit price
        assert line.amount == int((line.quantity * line.unit_amount_decimal).quantize(Decimal(1), ROUND_HALF_UP))


@given(plans(), st.lists(usages, max_size=20))
def test_marginal_costs_sum_to_the_total(plan: Plan, steps: list[Usage]) -> None:
    total, marginal_sum = Usage(), 0
    for step in steps:
        marginal = pricing.marginal_cost_micro(plan, total, step)
        assert marginal >= 0 or has_volume_tiers(plan)  # only volume tiers reprice every unit, down
        marginal_sum, total = marginal_sum + marginal, total + step
    assert marginal_sum == pricing.usage_cost_micro(plan, total)
    lines = pricing.price_usage(plan, total)
    rounded = pricing.subtotal(lines) * money.MICRO_PER_CENT
    assert abs(rounded - pricing.usage_cost_micro(plan, total)) <= len(lines) * money.MICRO_PER_CENT // 2


@given(plans(), usages, st.integers(1, 31 * DAY), st.data())
def test_amounts_are_ints_and_units_decimals(plan: Plan, usage: Usage, period: int, data: st.DataObject) -> None:
    seconds = data.draw(st.integers(0, period))
    for line in pricing.price_period([(plan, seconds, usage)], seconds_in_period=period):
        assert type(line.amount) is int
        assert type(line.quantity) is int
        assert line.amount >= 0
        assert type(line.unit_amount_decimal) is Decimal
        encoded = json.dumps(line.to_json())
        assert "E" not in line.to_json()["unit_amount_decimal"]
        assert json.loads(encoded, parse_float=_no_float_allowed) == line.to_json()


def _no_float_allowed(text: str) -> Any:
    raise AssertionError(f"a float in line JSON: {text}")


@given(plans(), usages, st.integers(1, 31 * DAY), st.data())
def test_one_segment_is_base_fee_plus_usage(plan: Plan, usage: Usage, period: int, data: st.DataObject) -> None:
    seconds = data.draw(st.sampled_from([period, data.draw(st.integers(0, period))]))
    fee = pricing.base_fee(plan, seconds_on_plan=seconds, seconds_in_period=period)
    expected = ([fee] if fee else []) + pricing.price_usage(plan, usage)
    assert pricing.price_period([(plan, seconds, usage)], seconds_in_period=period) == expected


# ---------------------------------------------------------------- catalog validation


def test_packaged_plans_load_with_exact_unit_prices() -> None:
    units = {p.id: [c.unit_micro(p) for c in pricing.METERED_CHARGES] for p in CATALOG.all()}
    # scale prices tokens in tiers: no flat unit price for them (see tests/unit/test_tiers.py)
    assert units == {"free": [0, 0, 0], "payg": [50_000, 2_000, 200], "pro": [0, 1_000, 150], "scale": [0, 0, 125]}


@pytest.mark.parametrize(("field", "price"), [
    ("price_per_request", "0.000000001"),
    ("price_per_1k_tokens", "0.000001"),
    ("price_per_1m_training_tokens", "0.001"),
])
def test_plan_with_sub_micro_cent_price_is_refused(field: str, price: str) -> None:
    with pytest.raises(ValidationError, match=f"{field} '{price}' is not a whole number of micro-cents"):
        make_plan(**{field: price})


def test_plan_prices_read_the_fields_they_name() -> None:
    plan = make_plan(price_per_request="0.01", price_per_1k_tokens="0.02", price_per_1m_training_tokens="0.03")
    assert {price.name: price.of(plan) for price in PRICES} == {field: getattr(plan, field) for field in PRICE_FIELDS}


def test_plan_with_float_price_is_refused() -> None:
    raw = json.loads('{"id": "f", "name": "F", "rpm_limit": 1, "tpm_limit": 1, "price_per_1k_tokens": 0.02}')
    with pytest.raises(ValidationError, match="never floats"):
        Plan.model_validate(raw)


def test_catalog_file_with_inexact_price_is_refused(tmp_path: Path) -> None:
    plan = {"id": "x", "name": "X", "rpm_limit": 1, "tpm_limit": 1, "price_per_1k_tokens": "0.0000001"}
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"plans": [plan]}))
    with pytest.raises(ValidationError, match="micro-cents"):
        PlanCatalog.load(path)
