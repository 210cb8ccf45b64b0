"""Pricing: usage + plan -> priced invoice lines. Pure functions, exact integer arithmetic, no I/O.

Units
    Amounts are integer cents (the currency's minor unit, taken to be 1/100 of the major unit). Unit prices
    are exact integers of micro-cents (1e-6 cent) per single unit: a plan's prices (``Decimal`` in the
    major unit per 1, 1k or 1M units) must convert exactly, which ``Plan`` checks when it is loaded.
    ``Line.unit_amount_decimal`` is the unit price in cents (Stripe's ``unit_amount_decimal``).

Charge models (one function each; ``charge_model(code)`` picks the one for a line code)
    ``base_fee``  flat fee, prorated by time: amount = half-up(base_fee_cents * seconds_on_plan /
                  seconds_in_period), quantity 1. A line is emitted when the plan has a fee and was held
                  for at least one second (even if the prorated amount rounds to 0 cents).
    ``requests``, ``tokens``, ``training_tokens``  metered with an allowance: billable quantity =
                  max(0, used - included); amount = half-up(quantity * unit micro-cents / 1e6).
                  A line is emitted whenever ``used > 0``, also when it is all included (quantity 0,
                  amount 0), so the invoice shows what was used; its description gives used and included.
                  Tokens and requests may instead be priced in tiers (``tiers``: graduated or volume): then
                  each tier reached is a line of its own (same code; quantity = its units), its flat amount,
                  when not zero, another line right after it (quantity 1, unit = amount = the flat cents).

Rounding
    Each line is rounded once, half-up (not banker's), to the cent; nothing is rounded before that, so a
    client recomputes any line as ``quantity * unit_amount_decimal`` rounded half-up.

Batch usage (``batch_requests``, ``batch_tokens``: the part of ``requests`` and ``tokens`` served by the Batch API)
    Priced at (100 - ``batch_discount_percent``)% of the plan's request and token prices, on lines of its own
    (codes ``batch_requests``, ``batch_tokens``). Interactive usage takes the allowance and the tiers first, batch
    usage what follows: a dimension's cost is ``C(interactive) + keep% x (C(all) - C(interactive))``, ``C`` its
    allowance- and tier-aware cost. A flat price gives one batch line (quantity = the batch units beyond the
    allowance, unit = the discounted price); graduated tiers a line per tier the batch units reach. ``Plan``
    checks that every discounted price is still whole micro-cents (so lines stay exact), and refuses a discount
    on volume tiers; there, batch usage is priced with the interactive on the same lines.

Plan changes within a period (``price_period``)
    Usage is priced by the plan in force when it was served; base fees are prorated by time on each plan;
    allowances are per plan, not prorated. Segments on the same plan are merged first (their seconds and
    usage summed), so each plan's allowance applies once per period and each of its lines is rounded once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from types import MappingProxyType
from typing import Any, TypeAlias

from modelmeter.billing.catalog import REQUEST_PRICE, TOKEN_PRICE, TRAINING_TOKEN_PRICE, Plan, PlanPrice, Tiers
from modelmeter.billing.counts import fieldwise
from modelmeter.billing.tiers import TIER_MODELS, PriceTier, TierPart, TiersMode, check_tiers, tiered_cost_micro
from modelmeter.money import (
    MICRO_PER_CENT,
    cents_decimal,
    decimal_text,
    micro_to_cents,
    round_half_up_div,
    unit_micro_cents,
)

SECONDS_PER_DAY = 86_400
LINE_CODES = ("base_fee", "requests", "tokens", "training_tokens", "batch_requests", "batch_tokens")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class Usage:
    """What was served: requests, inference tokens and training tokens; of the requests and tokens, those served
    by the Batch API (``batch_*``, included in ``requests`` and ``tokens``)."""

    requests: int = 0
    tokens: int = 0
    training_tokens: int = 0
    batch_requests: int = 0
    batch_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("requests", "tokens", "training_tokens", "batch_requests", "batch_tokens"):
            _check_count(name, getattr(self, name))
        if self.batch_requests > self.requests or self.batch_tokens > self.tokens:
            raise ValueError(f"batch usage is part of the usage, not more than it: {self}")

    def __add__(self, other: object) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return fieldwise(self, other)


@dataclass(frozen=True)
class Line:
    """One priced invoice line: ``amount`` (cents) = half-up(``quantity`` * ``unit_amount_decimal`` cents)."""

    code: str
    description: str
    quantity: int
    unit_amount_decimal: Decimal
    amount: int
    plan: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: the unit price as a plain decimal string, amounts as integers."""
        return {"code": self.code, "description": self.description, "quantity": self.quantity,
                "unit_amount_decimal": decimal_text(self.unit_amount_decimal), "amount": self.amount,
                "plan": self.plan}


@dataclass(frozen=True, slots=True)
class MeteredPrice:
    """One metered dimension of a plan: the quantity included, and the exact price beyond it: flat (``unit_micro``
    micro-cents per unit) or, when ``mode`` is set, in ``tiers`` (``unit_micro`` is then 0)."""

    included: int
    unit_micro: int = 0
    tiers: tuple[PriceTier, ...] = ()
    mode: TiersMode | None = None

    def __post_init__(self) -> None:
        if self.mode is None and self.tiers:
            raise ValueError("tiers need a mode (graduated or volume)")
        if self.mode is not None:
            if self.mode not in TIER_MODELS or self.unit_micro:
                raise ValueError("a tiered price has a known mode and no flat unit price")
            check_tiers(self.tiers)

    def billable(self, used: int) -> int:
        """The units of ``used`` beyond the allowance."""
        return max(0, used - self.included)

    def cost_micro(self, used: int) -> int:
        """The exact cost of ``used`` units: those beyond the allowance at the unit price, or priced by the tiers
        (flat amounts included; nothing at all when ``used`` is 0)."""
        if self.mode is None:
            return self.billable(used) * self.unit_micro
        return tiered_cost_micro(self.mode, self.tiers, self.billable(used)) if used else 0

    def parts(self, used: int) -> list[TierPart]:
        """The tiers ``used`` reaches (none when it is 0), with their quantities; tiered prices only."""
        if self.mode is None:
            raise ValueError("a flat price has no tiers")
        return TIER_MODELS[self.mode](self.tiers, self.billable(used)) if used else []


@dataclass(frozen=True, slots=True)
class MeteredPrices:
    """A plan's allowance and unit price for requests, tokens and training tokens: all that prices usage."""

    requests: MeteredPrice
    tokens: MeteredPrice
    training_tokens: MeteredPrice
    batch_discount_percent: int = 0

    def batch_cost_micro(self, price: MeteredPrice, used: int, batch: int) -> int:
        """The exact cost of ``used`` units of which ``batch`` were served by batches (see the module docstring);
        exact integers because ``Plan`` checks that the discounted prices are whole micro-cents."""
        whole = price.cost_micro(used)
        if not batch:
            return whole
        own = price.cost_micro(used - batch)
        return own + (whole - own) * (100 - self.batch_discount_percent) // 100


def _price(plan: Plan, included: int, price: PlanPrice, tiers: Tiers | None) -> MeteredPrice:
    if tiers is None:
        return MeteredPrice(included, price.unit_micro(plan))
    exact = tuple(PriceTier(tier.up_to, unit_micro_cents(tier.unit_amount_decimal, price.per_units),
                            tier.flat_amount_cents * MICRO_PER_CENT) for tier in tiers.tiers)
    return MeteredPrice(included, tiers=exact, mode=tiers.tiers_mode)


@lru_cache(maxsize=256)
def metered_prices(plan: Plan) -> MeteredPrices:
    """The plan's allowances and exact prices, flat or tiered (the one place they are read from a plan).

    Cached per plan (plans are frozen): the request path asks for them on every reservation."""
    return MeteredPrices(
        requests=_price(plan, plan.included_requests, REQUEST_PRICE, plan.request_tiers),
        tokens=_price(plan, plan.included_tokens, TOKEN_PRICE, plan.token_tiers),
        training_tokens=_price(plan, plan.included_training_tokens, TRAINING_TOKEN_PRICE, None),
        batch_discount_percent=plan.batch_discount_percent,
    )


@dataclass(frozen=True)
class MeteredCharge:
    """A metered invoice line: its code and label, the plan's price it bills, and the usage it meters."""

    code: str
    label: str
    price: Callable[[MeteredPrices], MeteredPrice]
    used: Callable[[Usage], int]
    batch: Callable[[Usage], int] = lambda usage: 0  # the part of ``used`` served by batches

    def unit_micro(self, plan: Plan) -> int:
        """The plan's exact flat price per single unit, in micro-cents (0 when the charge is priced in tiers)."""
        return self.price(metered_prices(plan)).unit_micro


METERED_CHARGES = (
    MeteredCharge("requests", "Requests", lambda prices: prices.requests, lambda usage: usage.requests,
                  lambda usage: usage.batch_requests),
    MeteredCharge("tokens", "Tokens", lambda prices: prices.tokens, lambda usage: usage.tokens,
                  lambda usage: usage.batch_tokens),
    MeteredCharge("training_tokens", "Training tokens", lambda prices: prices.training_tokens,
                  lambda usage: usage.training_tokens),
)


def metered_cost_micro(prices: MeteredPrices, usage: Usage) -> int:
    """The exact, unrounded cost of ``usage`` (no base fee) in micro-cents: for each metered charge, the usage
    beyond its allowance at its unit price.

    The one cost formula: ``usage_cost_micro`` and the quota stores' budget check (``quota.Caps``) both use it.
    The Redis quota store's Lua (``billing/quota/lua/usage_cost.lua``) mirrors it (tiers included): change both
    together.
    """
    return sum(prices.batch_cost_micro(charge.price(prices), charge.used(usage), charge.batch(usage))
               for charge in METERED_CHARGES)


def _days(seconds: int, *, whole: bool) -> str:
    """Seconds as days with one decimal (half-up); ``whole`` drops ``.0`` for a whole number of days."""
    if whole and seconds % SECONDS_PER_DAY == 0:
        return str(seconds // SECONDS_PER_DAY)
    tenths = round_half_up_div(seconds * 10, SECONDS_PER_DAY)
    return "<0.1" if tenths == 0 and seconds > 0 else f"{tenths // 10}.{tenths % 10}"


def _base_fee_description(plan: Plan, seconds_on_plan: int, seconds_in_period: int) -> str:
    text = f"{plan.name} plan base fee"
    if seconds_on_plan == seconds_in_period:
        return text
    return f"{text} ({_days(seconds_on_plan, whole=False)} of {_days(seconds_in_period, whole=True)} days)"


def base_fee(plan: Plan, *, seconds_on_plan: int, seconds_in_period: int) -> Line | None:
    """The flat base fee prorated by time on the plan; None when there is no fee or no time on the plan."""
    if seconds_in_period <= 0 or not 0 <= seconds_on_plan <= seconds_in_period:
        raise ValueError("need 0 <= seconds_on_plan <= seconds_in_period and seconds_in_period > 0")
    if plan.base_fee_cents == 0 or seconds_on_plan == 0:
        return None
    exact = plan.base_fee_cents * seconds_on_plan
    unit = cents_decimal(round_half_up_div(exact * 10**12, seconds_in_period), exponent=-12)
    return Line(code="base_fee", description=_base_fee_description(plan, seconds_on_plan, seconds_in_period),
                quantity=1, unit_amount_decimal=unit, amount=round_half_up_div(exact, seconds_in_period),
                plan=plan.id)


def metered(plan: Plan, *, code: str, used: int, included: int, unit_micro: int, label: str) -> Line | None:
    """A metered charge with an allowance; a line whenever ``used > 0``, with quantity = usage beyond it."""
    if code not in LINE_CODES[1:]:
        raise ValueError(f"unknown metered charge {code!r}")
    for name, value in (("used", used), ("included", included), ("unit_micro", unit_micro)):
        _check_count(name, value)
    if used == 0:
        return None
    price = MeteredPrice(included=included, unit_micro=unit_micro)
    description = f"{label}: {used:,} used" + (f", {included:,} included" if included else "")
    return Line(code=code, description=description, quantity=price.billable(used),
                unit_amount_decimal=cents_decimal(unit_micro),
                amount=micro_to_cents(price.cost_micro(used)), plan=plan.id)


def _tier_range(part: TierPart) -> str:
    return f"{part.first:,} and above" if part.last is None else f"{part.first:,}\u2013{part.last:,}"


def tiered(plan: Plan, *, code: str, used: int, price: MeteredPrice, label: str) -> list[Line]:
    """A charge priced in tiers: a line per tier reached (quantity = the units it prices), and after it a line
    for its flat amount when that is not zero. No lines when ``used`` is 0."""
    if code not in LINE_CODES[1:]:
        raise ValueError(f"unknown metered charge {code!r}")
    _check_count("used", used)
    lines = []
    for part in price.parts(used):
        tier = f"{label} {_tier_range(part)} (tier {part.index + 1} of {part.count}, {price.mode})"
        usage = f"{used:,} used" + (f", {price.included:,} included" if price.included else "")
        lines.append(Line(code=code, description=f"{tier}: {usage}", quantity=part.quantity,
                          unit_amount_decimal=cents_decimal(part.unit_micro),
                          amount=micro_to_cents(part.quantity * part.unit_micro), plan=plan.id))
        if part.flat_micro:
            lines.append(Line(code=code, description=f"{tier}: flat fee", quantity=1,
                              unit_amount_decimal=cents_decimal(part.flat_micro),
                              amount=micro_to_cents(part.flat_micro), plan=plan.id))
    return lines


def _interactive(charge: MeteredCharge, price: MeteredPrice, usage: Usage) -> int:
    """The units the charge's own lines price: all but the batch ones (a volume-tiered dimension: all of them)."""
    return charge.used(usage) - (0 if price.mode == "volume" else charge.batch(usage))


def _metered_lines(charge: MeteredCharge, plan: Plan, prices: MeteredPrices, usage: Usage) -> list[Line]:
    price = charge.price(prices)
    used = _interactive(charge, price, usage)
    if price.mode is not None:
        return tiered(plan, code=charge.code, used=used, price=price, label=charge.label)
    line = metered(plan, code=charge.code, used=used, included=price.included,
                   unit_micro=price.unit_micro, label=charge.label)
    return [] if line is None else [line]


def _discounted(micro: int, keep: int) -> int:
    return micro * keep // 100  # exact: ``Plan`` checks that every discounted price is whole micro-cents


def batch_lines(charge: MeteredCharge, plan: Plan, prices: MeteredPrices, usage: Usage) -> list[Line]:
    """The batch lines of a charge: the batch units after the interactive ones, at the discounted prices (see the
    module docstring); none without batch usage, or on volume tiers (their lines price both)."""
    price, batch = charge.price(prices), charge.batch(usage)
    if not batch or price.mode == "volume":
        return []
    code, label, keep = f"batch_{charge.code}", f"{charge.label} (batch)", 100 - prices.batch_discount_percent
    used, own = charge.used(usage), charge.used(usage) - batch
    note = f"{batch:,} used" + (f", {prices.batch_discount_percent}% batch discount"
                                if prices.batch_discount_percent else "")
    if price.mode is None:
        unit = _discounted(price.unit_micro, keep)
        quantity = price.billable(used) - price.billable(own)
        return [Line(code=code, description=f"{label}: {note}", quantity=quantity,
                     unit_amount_decimal=cents_decimal(unit), amount=micro_to_cents(quantity * unit), plan=plan.id)]
    before = {part.index: part for part in price.parts(own)}
    lines = []
    for part in price.parts(used):
        tier = f"{label} {_tier_range(part)} (tier {part.index + 1} of {part.count}, {price.mode})"
        earlier = before.get(part.index)
        quantity = part.quantity - (earlier.quantity if earlier else 0)
        if quantity or earlier is None:
            unit = _discounted(part.unit_micro, keep)
            lines.append(Line(code=code, description=f"{tier}: {note}", quantity=quantity,
                              unit_amount_decimal=cents_decimal(unit), amount=micro_to_cents(quantity * unit),
                              plan=plan.id))
        if part.flat_micro and earlier is None:  # a tier first reached by batch units: its flat amount is theirs
            flat = _discounted(part.flat_micro, keep)
            lines.append(Line(code=code, description=f"{tier}: flat fee", quantity=1,
                              unit_amount_decimal=cents_decimal(flat), amount=micro_to_cents(flat), plan=plan.id))
    if not lines:  # every batch unit fell in the tier the interactive ones had reached, within its allowance
        last = price.parts(used)[-1]
        lines.append(Line(code=code, description=f"{label} (tier {last.index + 1} of {last.count}, {price.mode}): "
                          f"{note}", quantity=0, unit_amount_decimal=cents_decimal(_discounted(last.unit_micro, keep)),
                          amount=0, plan=plan.id))
    return lines


@dataclass(frozen=True)
class Segment:
    """A stretch of a period on one plan: how long it was held, and the usage served on it."""

    seconds_on_plan: int
    seconds_in_period: int
    usage: Usage

    def __post_init__(self) -> None:
        if self.seconds_in_period <= 0 or not 0 <= self.seconds_on_plan <= self.seconds_in_period:
            raise ValueError("need 0 <= seconds_on_plan <= seconds_in_period and seconds_in_period > 0")


ChargeFn: TypeAlias = "Callable[[Plan, Segment], list[Line]]"


def _flat_prorated(plan: Plan, segment: Segment) -> list[Line]:
    line = base_fee(plan, seconds_on_plan=segment.seconds_on_plan, seconds_in_period=segment.seconds_in_period)
    return [] if line is None else [line]


def _metered_model(charge: MeteredCharge, *, batch: bool = False) -> ChargeFn:
    lines = batch_lines if batch else _metered_lines

    def price(plan: Plan, segment: Segment) -> list[Line]:
        return lines(charge, plan, metered_prices(plan), segment.usage)

    return price


CHARGE_MODELS: Mapping[str, ChargeFn] = MappingProxyType(
    {"base_fee": _flat_prorated} | {charge.code: _metered_model(charge) for charge in METERED_CHARGES}
    | {f"batch_{charge.code}": _metered_model(charge, batch=True) for charge in METERED_CHARGES[:2]}
)


def charge_model(code: str) -> ChargeFn:
    """The pricing function for a line code: ``(plan, segment) -> lines`` (none, one, or one per tier reached)."""
    try:
        return CHARGE_MODELS[code]
    except KeyError:
        raise ValueError(f"unknown charge {code!r}; known: {', '.join(LINE_CODES)}") from None


def price_usage(plan: Plan, usage: Usage) -> list[Line]:
    """The requests, tokens and training-token lines for usage served on one plan (no base fee)."""
    prices = metered_prices(plan)
    return [line for charge in METERED_CHARGES for line in _metered_lines(charge, plan, prices, usage)] + [
        line for charge in METERED_CHARGES[:2] for line in batch_lines(charge, plan, prices, usage)]


def _merge(segments: Iterable[tuple[Plan, int, Usage]]) -> dict[Plan, tuple[int, Usage]]:
    """Segments on the same plan summed, in order of first appearance."""
    merged: dict[Plan, tuple[int, Usage]] = {}
    for plan, seconds, usage in segments:
        held, used = merged.get(plan, (0, Usage()))
        merged[plan] = (held + seconds, used + usage)
    return merged


def price_period(segments: list[tuple[Plan, int, Usage]], *, seconds_in_period: int) -> list[Line]:
    """All lines of one period: per plan held, its prorated base fee and the usage served on it.

    ``segments`` are ``(plan, seconds_on_plan, usage)``; their seconds may not exceed the period.
    """
    if any(seconds < 0 for _, seconds, _ in segments) or sum(s for _, s, _ in segments) > seconds_in_period:
        raise ValueError("segment seconds must be non-negative and fit in the period")
    lines: list[Line] = []
    for plan, (seconds, usage) in _merge(segments).items():
        segment = Segment(seconds, seconds_in_period, usage)
        lines.extend(line for code in LINE_CODES for line in charge_model(code)(plan, segment))
    return lines


def subtotal(lines: Iterable[Line]) -> int:
    """The sum of the lines' amounts, in cents."""
    return sum(line.amount for line in lines)


def usage_cost_micro(plan: Plan, usage: Usage) -> int:
    """The exact, unrounded cost of the usage charges (no base fee) in micro-cents, for budgets."""
    return metered_cost_micro(metered_prices(plan), usage)


def marginal_cost_micro(plan: Plan, before: Usage, added: Usage) -> int:
    """What ``added`` costs on top of ``before`` (allowance- and tier-aware), in exact micro-cents. Negative when
    ``added`` moves a volume-tiered dimension into a cheaper tier (every unit is repriced)."""
    return usage_cost_micro(plan, before + added) - usage_cost_micro(plan, before)
