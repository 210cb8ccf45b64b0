"""Tiered prices (Stripe's ``graduated`` and ``volume``) in exact integer micro-cents. Pure functions, no I/O.

A tiered dimension prices ``q`` billable units of a period (the units used beyond the plan's allowance). Tier
bounds (``up_to``) count billable units, ascend strictly, and the last tier has no bound.

Charge models (one function each; ``TIER_MODELS[mode]`` picks it)
    ``graduated``  each tier prices the units that fall in it, ``(previous up_to, up_to]``, at its unit price,
                   plus its flat amount once reached: 1,500 units over tiers 0-1,000 at 1¢ and beyond at 0.5¢
                   cost 1,000 x 1¢ + 500 x 0.5¢ = 1,250¢.
    ``volume``     all ``q`` units at the unit price of the tier ``q`` falls in (the first with ``q <= up_to``),
                   plus that tier's flat amount: the same 1,500 units cost 1,500 x 0.5¢ = 750¢.
    The first tier counts as reached at ``q = 0``: a dimension used only within its allowance still pays the
    first tier's flat amount. A dimension not used at all costs nothing (``pricing.MeteredPrice.cost_micro``).

With ``volume`` more usage can cost less (crossing into a cheaper tier reprices every unit), so a marginal cost
can be negative; with ``graduated`` (and flat prices) it never is.

Each reached tier is a ``TierPart``; ``pricing`` turns a part into invoice lines (one for its units, one for its
flat amount when that is not zero). The Redis quota script mirrors ``tiered_cost_micro``
(``billing/quota/lua/usage_cost.lua``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeAlias

TiersMode: TypeAlias = Literal["graduated", "volume"]


@dataclass(frozen=True, slots=True)
class PriceTier:
    """One tier in exact terms: its bound in billable units (None: none), micro-cents per unit and flat."""

    up_to: int | None
    unit_micro: int
    flat_micro: int = 0


@dataclass(frozen=True, slots=True)
class TierPart:
    """What one reached tier charges: ``quantity`` units at ``unit_micro`` each, plus ``flat_micro`` once.

    ``index`` is 0-based among ``count`` tiers; ``first`` and ``last`` are the tier's bounds in billable units
    (1-based, inclusive; ``last`` None: no bound), for descriptions."""

    index: int
    count: int
    first: int
    last: int | None
    quantity: int
    unit_micro: int
    flat_micro: int

    @property
    def cost_micro(self) -> int:
        """The part's exact cost: its units at the unit price, plus the flat amount."""
        return self.quantity * self.unit_micro + self.flat_micro


def _part(tiers: tuple[PriceTier, ...], index: int, quantity: int) -> TierPart:
    tier = tiers[index]
    first = 1 if index == 0 else (tiers[index - 1].up_to or 0) + 1
    return TierPart(index, len(tiers), first, tier.up_to, quantity, tier.unit_micro, tier.flat_micro)


def graduated(tiers: tuple[PriceTier, ...], billable: int) -> list[TierPart]:
    """Each reached tier with the units of ``billable`` that fall in it (the first tier is always reached)."""
    parts, lower = [], 0
    for index, tier in enumerate(tiers):
        if index > 0 and billable <= lower:
            break
        upper = billable if tier.up_to is None else min(billable, tier.up_to)
        parts.append(_part(tiers, index, upper - lower))
        lower = upper if tier.up_to is None else tier.up_to
    return parts


def volume(tiers: tuple[PriceTier, ...], billable: int) -> list[TierPart]:
    """The one tier ``billable`` falls in, with every unit."""
    for index, tier in enumerate(tiers):
        if tier.up_to is None or billable <= tier.up_to:
            return [_part(tiers, index, billable)]
    raise ValueError("the last tier must have no bound")


TierModel: TypeAlias = "Callable[[tuple[PriceTier, ...], int], list[TierPart]]"
TIER_MODELS: Mapping[str, TierModel] = MappingProxyType({"graduated": graduated, "volume": volume})


def tiered_cost_micro(mode: TiersMode, tiers: tuple[PriceTier, ...], billable: int) -> int:
    """The exact cost of ``billable`` units (flat amounts included) in micro-cents."""
    return sum(part.cost_micro for part in TIER_MODELS[mode](tiers, billable))


def check_tiers(tiers: tuple[PriceTier, ...]) -> None:
    """ValueError unless the bounds ascend strictly, only the last is unbounded, and amounts are non-negative."""
    if not tiers:
        raise ValueError("at least one tier is needed")
    previous = 0
    for index, tier in enumerate(tiers):
        last = index == len(tiers) - 1
        if (tier.up_to is None) != last:
            raise ValueError("only the last tier, and it always, has no bound")
        if tier.up_to is not None and tier.up_to <= previous:
            raise ValueError("tier bounds must ascend strictly from 1")
        if tier.unit_micro < 0 or tier.flat_micro < 0:
            raise ValueError("tier prices must not be negative")
        previous = tier.up_to or previous
