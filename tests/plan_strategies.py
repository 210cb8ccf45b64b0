"""Hypothesis strategies for plans priced in tiers (graduated or volume, with flat amounts and allowances)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from modelmeter.billing.catalog import Plan
from modelmeter.billing.pricing import Usage


def price_text(micro_per_unit: int, per_units: int) -> str:
    """Whole micro-cents per unit as a decimal string in dollars per ``per_units`` units."""
    return format(Decimal(micro_per_unit * per_units).scaleb(-8), "f")


@st.composite
def tiers_json(draw: st.DrawFn, *, per_units: int, max_step: int, max_unit_micro: int = 10**7) -> dict[str, Any]:
    """A valid ``token_tiers`` / ``request_tiers`` object: ascending bounds ``max_step`` apart at most, the last
    unbounded, random unit prices (whole micro-cents per unit) and flat amounts (often zero)."""
    count = draw(st.integers(1, 4))
    bounds, bound = [], 0
    for _ in range(count - 1):
        bound += draw(st.integers(1, max_step))
        bounds.append(bound)
    flats = st.one_of(st.just(0), st.integers(0, 100_000))
    tiers = [{"up_to": up_to, "unit_amount_decimal": price_text(draw(st.integers(0, max_unit_micro)), per_units),
              "flat_amount_cents": draw(flats)} for up_to in [*bounds, None]]
    return {"tiers_mode": draw(st.sampled_from(["graduated", "volume"])), "tiers": tiers}


@st.composite
def tiered_plans(draw: st.DrawFn, *, request_step: int = 50, token_step: int = 500_000,
                 max_included: int = 10**6) -> Plan:
    """A plan with token tiers, request tiers or both (the other dimensions flat), and random allowances."""
    which = draw(st.sampled_from([("token_tiers",), ("request_tiers",), ("token_tiers", "request_tiers")]))
    fields: dict[str, Any] = {
        "base_fee_cents": draw(st.integers(0, 10**6)),
        "price_per_1m_training_tokens": price_text(draw(st.integers(0, 10**7)), 1_000_000),
        "included_requests": draw(st.integers(0, min(max_included, 100))),
        "included_tokens": draw(st.integers(0, max_included)),
        "included_training_tokens": draw(st.integers(0, max_included)),
    }
    if "token_tiers" in which:
        fields["token_tiers"] = draw(tiers_json(per_units=1_000, max_step=token_step))
    else:
        fields["price_per_1k_tokens"] = price_text(draw(st.integers(0, 10**7)), 1_000)
    if "request_tiers" in which:
        fields["request_tiers"] = draw(tiers_json(per_units=1, max_step=request_step))
    else:
        fields["price_per_request"] = price_text(draw(st.integers(0, 10**7)), 1)
    return Plan.model_validate({"id": "tiered", "name": "Tiered", "rpm_limit": 60, "tpm_limit": 60_000, **fields})


def has_volume_tiers(plan: Plan) -> bool:
    """Whether a dimension of the plan is priced in volume tiers (more usage may then cost less)."""
    return any(t is not None and t.tiers_mode == "volume" for t in (plan.token_tiers, plan.request_tiers))


@st.composite
def with_batch_discount(draw: st.DrawFn, plans: st.SearchStrategy[Plan]) -> Plan:
    """A plan of ``plans`` with a random ``batch_discount_percent`` where its prices allow one (every discounted
    price whole micro-cents, no volume tiers), else the plan as drawn."""
    plan = draw(plans)
    percent = draw(st.sampled_from([0, 50, 50, 20, 25, 100, 37]))
    try:
        return Plan.model_validate(plan.model_dump(mode="json") | {"batch_discount_percent": percent})
    except ValueError:  # pydantic's ValidationError is one
        return plan


@st.composite
def batch_usages(draw: st.DrawFn, *, max_requests: int = 10**6, max_tokens: int = 10**9) -> Usage:
    """A ``Usage`` whose requests and tokens are partly (or wholly, or not at all) Batch API usage."""
    requests, tokens = draw(st.integers(0, max_requests)), draw(st.integers(0, max_tokens))
    return Usage(requests, tokens, draw(st.integers(0, 10**9)), draw(st.integers(0, requests)),
                 draw(st.integers(0, tokens)))
