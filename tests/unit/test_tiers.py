"""Tiered prices: exact amounts from the anchors (Lago's specs), lines per tier, catalog validation located at the
tier, and the property that per-request marginal costs add up to the period's tiered price."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from modelmeter import money
from modelmeter.billing import pricing
from modelmeter.billing.catalog import Plan, PlanCatalog
from modelmeter.billing.pricing import MeteredPrice, Usage
from modelmeter.billing.tiers import PriceTier
from modelmeter.errors import install_handlers
from tests.plan_strategies import has_volume_tiers, tiered_plans

CATALOG = PlanCatalog.load()
SCALE = CATALOG.get("scale")


def make_plan(**fields: Any) -> Plan:
    return Plan.model_validate({"id": "tiers", "name": "Tiers", "rpm_limit": 60, "tpm_limit": 60_000, **fields})


def tiers(mode: str, *rows: tuple[int | None, str, int]) -> dict[str, Any]:
    return {"tiers_mode": mode, "tiers": [{"up_to": up_to, "unit_amount_decimal": unit, "flat_amount_cents": flat}
                                          for up_to, unit, flat in rows]}


def lago(mode: str, *, flat: tuple[int, int] = (0, 0), included: int = 0) -> Plan:
    """Lago's anchors as request tiers: 0-1,000 at $0.01, then $0.005 per request."""
    return make_plan(included_requests=included,
                     request_tiers=tiers(mode, (1_000, "0.01", flat[0]), (None, "0.005", flat[1])))


def summary(plan: Plan, usage: Usage) -> list[tuple[str, int, str, int]]:
    return [(line.code, line.quantity, format(line.unit_amount_decimal, "f"), line.amount)
            for line in pricing.price_usage(plan, usage)]


# ---------------------------------------------------------------- the anchors, exact to the cent

ANCHORS = [
    # plan, requests used, total cents (lines' subtotal = exact cost, to the micro-cent)
    (lago("graduated"), 1_500, 1250),  # 1,000 x 1¢ + 500 x 0.5¢
    (lago("graduated"), 1_000, 1000),
    (lago("graduated"), 1_001, 1001),  # 1,000 x 1¢ + 1 x 0.5¢ = 1000.5 -> 1001 (half-up, on its own line)
    (lago("graduated"), 1, 1),
    (lago("volume"), 1_500, 750),  # every request at the second tier's 0.5¢
    (lago("volume"), 1_000, 1000),  # 1,000 is still in the first tier
    (lago("volume"), 1_001, 501),  # 1,001 x 0.5¢ = 500.5 -> 501
    (lago("graduated", included=2_000), 1_500, 0),  # all within the allowance
    (lago("graduated", included=500), 1_500, 1000),  # 1,000 billable
    (lago("volume", included=500), 2_000, 750),  # 1,500 billable
    # Flat amounts: once per tier reached (graduated: every reached tier's; volume: only the final tier's).
    (lago("graduated", flat=(100, 200)), 1_500, 1550),
    (lago("graduated", flat=(100, 200)), 1_000, 1100),  # the second tier is not reached at exactly 1,000
    (lago("volume", flat=(100, 200)), 1_500, 950),
    (lago("volume", flat=(100, 200)), 1_000, 1100),
    # 0 billable units (used within the allowance): the first tier's flat amount only.
    (lago("graduated", flat=(100, 200), included=5_000), 1_500, 100),
    (lago("volume", flat=(100, 200), included=5_000), 1, 100),
    (lago("graduated", flat=(100, 200)), 0, 0),  # nothing used: no line, no charge
    (lago("volume", flat=(100, 200)), 0, 0),
]


@pytest.mark.parametrize(("plan", "used", "cents"), ANCHORS)
def test_anchor_amounts(plan: Plan, used: int, cents: int) -> None:
    usage = Usage(requests=used)
    lines = pricing.price_usage(plan, usage)
    assert pricing.subtotal(lines) == cents
    exact = pricing.usage_cost_micro(plan, usage)
    assert abs(exact - cents * money.MICRO_PER_CENT) <= len(lines) * money.MICRO_PER_CENT // 2
    assert (lines == []) == (used == 0)


def test_graduated_lines_one_per_tier_reached() -> None:
    plan = lago("graduated", flat=(100, 200))
    assert summary(plan, Usage(requests=1_500)) == [
        ("requests", 1_000, "1", 1000), ("requests", 1, "100", 100),
        ("requests", 500, "0.5", 250), ("requests", 1, "200", 200),
    ]
    descriptions = [line.description for line in pricing.price_usage(plan, Usage(requests=1_500))]
    assert descriptions == [
        "Requests 1\u20131,000 (tier 1 of 2, graduated): 1,500 used",
        "Requests 1\u20131,000 (tier 1 of 2, graduated): flat fee",
        "Requests 1,001 and above (tier 2 of 2, graduated): 1,500 used",
        "Requests 1,001 and above (tier 2 of 2, graduated): flat fee",
    ]


def test_volume_line_prices_every_unit_at_the_final_tier() -> None:
    plan = lago("volume", flat=(100, 200), included=10)
    assert summary(plan, Usage(requests=1_510)) == [("requests", 1_500, "0.5", 750), ("requests", 1, "200", 200)]
    (line, _) = pricing.price_usage(plan, Usage(requests=1_510))
    assert line.description == "Requests 1,001 and above (tier 2 of 2, volume): 1,510 used, 10 included"


def test_within_the_allowance_shows_the_first_tier_with_nothing_billable() -> None:
    assert summary(lago("graduated", included=2_000), Usage(requests=3)) == [("requests", 0, "1", 0)]
    assert summary(lago("volume", flat=(7, 0), included=2_000), Usage(requests=3)) == [
        ("requests", 0, "1", 0), ("requests", 1, "7", 7)]


TOKEN_TABLE = [
    # scale: 10M tokens included; graduated per 1k: 0.8¢ to 100M billable, 0.5¢ to 1B, then 0.3¢
    (Usage(tokens=10_000_000), [("tokens", 0, "0.0008", 0)]),
    (Usage(tokens=10_000_624), [("tokens", 624, "0.0008", 0)]),  # 0.4992 -> 0
    (Usage(tokens=10_000_625), [("tokens", 625, "0.0008", 1)]),  # 0.5 -> 1
    (Usage(tokens=60_000_000), [("tokens", 50_000_000, "0.0008", 40_000)]),
    (Usage(tokens=110_000_000), [("tokens", 100_000_000, "0.0008", 80_000)]),
    (Usage(tokens=250_000_000), [("tokens", 100_000_000, "0.0008", 80_000), ("tokens", 140_000_000, "0.0005", 70_000)]),
    (Usage(tokens=1_510_000_000), [("tokens", 100_000_000, "0.0008", 80_000),
                                   ("tokens", 900_000_000, "0.0005", 450_000),
                                   ("tokens", 500_000_000, "0.0003", 150_000)]),
    (Usage(requests=5, tokens=10_000_001), [("requests", 5, "0", 0), ("tokens", 1, "0.0008", 0)]),
]


@pytest.mark.parametrize(("usage", "lines"), TOKEN_TABLE)
def test_scale_token_tiers_exact(usage: Usage, lines: list[tuple[str, int, str, int]]) -> None:
    assert summary(SCALE, usage) == lines


def test_token_tiers_price_per_1k() -> None:
    plan = make_plan(token_tiers=tiers("volume", (1_000_000, "0.0200", 0), (None, "0.0100", 500)))
    assert summary(plan, Usage(tokens=1_000_000)) == [("tokens", 1_000_000, "0.002", 2000)]
    assert summary(plan, Usage(tokens=1_000_001)) == [("tokens", 1_000_001, "0.001", 1000), ("tokens", 1, "500", 500)]
    assert pricing.usage_cost_micro(plan, Usage(tokens=1_000_001)) == 1_000_001 * 1_000 + 500 * money.MICRO_PER_CENT


def test_untiered_dimensions_of_a_tiered_plan_stay_flat() -> None:
    lines = pricing.price_usage(SCALE, Usage(training_tokens=21_000_000))
    assert [(x.code, x.quantity, x.amount, x.description) for x in lines] == [
        ("training_tokens", 1_000_000, 125, "Training tokens: 21,000,000 used, 20,000,000 included")]


def test_scale_invoice_for_a_month() -> None:
    lines = pricing.price_period([(SCALE, 30 * 86_400, Usage(requests=90_000, tokens=250_000_000))],
                                 seconds_in_period=30 * 86_400)
    assert [(x.code, x.quantity, x.amount) for x in lines] == [
        ("base_fee", 1, 49_900), ("requests", 90_000, 0), ("tokens", 100_000_000, 80_000),
        ("tokens", 140_000_000, 70_000)]
    assert pricing.subtotal(lines) == 199_900


def test_volume_marginal_cost_is_negative_across_a_cheaper_tier() -> None:
    plan = lago("volume")
    before = Usage(requests=1_000)  # 1,000 x 1¢ = 1000¢; one more: 1,001 x 0.5¢ = 500.5¢
    assert pricing.marginal_cost_micro(plan, before, Usage(requests=1)) == -499_500_000


def test_metered_price_refuses_inconsistent_tiers() -> None:
    with pytest.raises(ValueError, match="tiers need a mode"):
        MeteredPrice(0, tiers=(PriceTier(None, 1),))
    with pytest.raises(ValueError, match="no flat unit price"):
        MeteredPrice(0, unit_micro=5, tiers=(PriceTier(None, 1),), mode="graduated")
    with pytest.raises(ValueError, match="ascend strictly"):
        MeteredPrice(0, tiers=(PriceTier(5, 1), PriceTier(5, 1), PriceTier(None, 1)), mode="volume")
    with pytest.raises(ValueError, match="only the last tier"):
        MeteredPrice(0, tiers=(PriceTier(5, 1),), mode="graduated")
    with pytest.raises(ValueError, match="a flat price has no tiers"):
        MeteredPrice(0, 1).parts(3)


# ---------------------------------------------------------------- the property


@given(tiered_plans(), st.lists(st.tuples(st.integers(1, 3), st.integers(0, 200_000)), max_size=60))
def test_per_request_marginal_costs_sum_to_the_period_price(plan: Plan, requests: list[tuple[int, int]]) -> None:
    """Priced one request at a time (as reservations are), the period costs exactly its tiered price; the rounded
    lines differ from it by at most half a cent a line."""
    total, marginal_sum = Usage(), 0
    for count, tokens in requests:
        step = Usage(requests=count, tokens=tokens)
        marginal = pricing.marginal_cost_micro(plan, total, step)
        assert marginal >= 0 or has_volume_tiers(plan)
        marginal_sum, total = marginal_sum + marginal, total + step
    exact = pricing.usage_cost_micro(plan, total)
    assert marginal_sum == exact
    lines = pricing.price_usage(plan, total)
    assert abs(pricing.subtotal(lines) * money.MICRO_PER_CENT - exact) <= len(lines) * money.MICRO_PER_CENT // 2
    for line in lines:
        assert line.amount == int((line.quantity * line.unit_amount_decimal).quantize(Decimal(1), ROUND_HALF_UP))


@given(tiered_plans())
def test_tiered_plan_json_round_trips(plan: Plan) -> None:
    dumped = plan.model_dump(mode="json")
    assert Plan.model_validate(dumped) == plan
    assert ("price_per_1k_tokens" in dumped) == (plan.token_tiers is None) != ("token_tiers" in dumped)
    assert ("price_per_request" in dumped) == (plan.request_tiers is None) != ("request_tiers" in dumped)


# ---------------------------------------------------------------- validation names the tier

GOOD = (1_000, "0.01", 0)
BAD_TIERS = [
    # tiers, location of the error, words in its message
    (tiers("graduated", (1_000, "0.01", 0), (500, "0.005", 0), (None, "0.001", 0)), ("tiers", 1, "up_to"),
     "tier 2 of 3: up_to 500 must be greater than the previous tier's up_to 1000"),
    (tiers("graduated", GOOD, (1_000, "0.005", 0), (None, "0.001", 0)), ("tiers", 1, "up_to"),
     "must be greater than the previous tier's up_to 1000"),
    (tiers("volume", GOOD, (2_000, "0.005", 0)), ("tiers", 1, "up_to"), "the last tier's up_to must be null"),
    (tiers("volume", (None, "0.01", 0), (None, "0.005", 0)), ("tiers", 0, "up_to"),
     "only the last tier may have up_to null"),
    (tiers("graduated", GOOD, (None, "-0.005", 0)), ("tiers", 1, "unit_amount_decimal"),
     "must be finite and non-negative"),
    (tiers("graduated", GOOD, (None, "abc", 0)), ("tiers", 1, "unit_amount_decimal"), "is not a decimal number"),
    (tiers("graduated", GOOD, (None, "NaN", 0)), ("tiers", 1, "unit_amount_decimal"), "finite"),
    (tiers("graduated", GOOD, (None, "1e-3", 0)), ("tiers", 1, "unit_amount_decimal"), "plain digits"),
    (tiers("graduated", GOOD, (None, "0.000000001", 0)), ("tiers", 1, "unit_amount_decimal"),
     "tier 2 of 2: unit_amount_decimal '0.000000001' is not a whole number of micro-cents (0.000001 cent) per "
     "request: use at most 8 decimal places"),
    (tiers("graduated", GOOD, (None, "0.005", -1)), ("tiers", 1, "flat_amount_cents"), "greater than or equal to 0"),
    (tiers("graduated", (0, "0.01", 0), (None, "0.005", 0)), ("tiers", 0, "up_to"), "greater than or equal to 1"),
    (tiers("graduated"), ("tiers",), "at least one tier"),
    (tiers("stepped", (None, "0.01", 0)), ("tiers_mode",), "'graduated' or 'volume'"),
]


@pytest.mark.parametrize(("request_tiers", "loc", "message"), BAD_TIERS)
def test_bad_tiers_are_refused_at_the_tier(request_tiers: dict[str, Any], loc: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        make_plan(request_tiers=request_tiers)
    (error,) = refused.value.errors()
    assert error["loc"] == ("request_tiers", *loc)
    assert message in error["msg"]


@pytest.mark.parametrize(("value", "message"), [
    (0.01, "never a number"), (1, "never a number"), (True, "never a number"), (None, "never a number"),
])
def test_tier_prices_are_decimal_strings(value: Any, message: str) -> None:
    raw = tiers("graduated", (None, "0", 0))
    raw["tiers"][0]["unit_amount_decimal"] = value
    with pytest.raises(ValidationError) as refused:
        make_plan(token_tiers=raw)
    (error,) = refused.value.errors()
    assert error["loc"] == ("token_tiers", "tiers", 0, "unit_amount_decimal")
    assert message in error["msg"]


def test_token_tier_prices_are_exact_per_token() -> None:
    with pytest.raises(ValidationError) as refused:
        make_plan(token_tiers=tiers("volume", (5, "0.01", 0), (None, "0.000001", 0)))
    (error,) = refused.value.errors()
    assert error["loc"] == ("token_tiers", "tiers", 1, "unit_amount_decimal")
    assert "per token: use at most 5 decimal places" in error["msg"]


@pytest.mark.parametrize(("field", "flat"), [("token_tiers", "price_per_1k_tokens"),
                                             ("request_tiers", "price_per_request")])
def test_tiers_and_the_flat_price_together_are_refused(field: str, flat: str) -> None:
    with pytest.raises(ValidationError) as refused:
        make_plan(**{field: tiers("graduated", (None, "0.01", 0)), flat: "0.0000"})
    (error,) = refused.value.errors()
    assert error["loc"] == (field,)
    assert f"a plan with {field} has no {flat}" in error["msg"]


def test_up_to_must_be_an_integer() -> None:
    for up_to in ("1000", 1000.0, True):
        raw = tiers("graduated", GOOD, (None, "0.005", 0))
        raw["tiers"][0]["up_to"] = up_to
        with pytest.raises(ValidationError) as refused:
            make_plan(request_tiers=raw)
        assert refused.value.errors()[0]["loc"] == ("request_tiers", "tiers", 0, "up_to")


def test_api_envelope_names_the_tier() -> None:
    """Whatever route takes a plan in its body answers 422 with ``param`` naming the tier's field."""
    app = FastAPI()
    install_handlers(app)

    @app.post("/plans")
    def post_plan(plan: Plan) -> dict[str, str]:
        return {"id": plan.id}

    body = {"id": "t", "name": "T", "rpm_limit": 1, "tpm_limit": 1,
            "token_tiers": tiers("graduated", (1_000, "0.01", 0), (1_000, "0.005", 0), (None, "0.001", 0))}
    response = TestClient(app).post("/plans", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "token_tiers.tiers.1.up_to")
    assert "tier 2 of 3" in error["message"]


def test_catalog_file_errors_name_the_plan_and_the_tier(tmp_path: Path) -> None:
    good = {"id": "ok", "name": "OK", "rpm_limit": 1, "tpm_limit": 1}
    bad = {**good, "id": "bad", "token_tiers": tiers("volume", (100, "0.01", 0), (50, "0.02", 0), (None, "0", 0))}
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"plans": [good, bad]}))
    with pytest.raises(ValidationError) as refused:
        PlanCatalog.load(path)
    assert refused.value.errors()[0]["loc"] == ("plans", 1, "token_tiers", "tiers", 1, "up_to")
    assert "plans.1.token_tiers.tiers.1.up_to" in str(refused.value)


def test_untiered_plan_json_is_unchanged() -> None:
    payg = CATALOG.get("payg").model_dump(mode="json")
    assert "token_tiers" not in payg
    assert "request_tiers" not in payg
    assert payg["price_per_1k_tokens"] == "0.0200"


def test_scale_json_shows_its_tiers_and_no_token_price() -> None:
    scale = SCALE.model_dump(mode="json")
    assert "price_per_1k_tokens" not in scale
    assert "request_tiers" not in scale
    assert scale["token_tiers"] == tiers("graduated", (100_000_000, "0.0080", 0), (1_000_000_000, "0.0050", 0),
                                         (None, "0.0030", 0))
    assert scale["price_per_request"] == "0.0000"
