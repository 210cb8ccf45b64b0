"""Money units: amounts are integer cents, unit prices exact integers of micro-cents (1e-6 cent) per unit."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

MICRO_PER_CENT = 1_000_000
MICRO_PER_MAJOR = 100 * MICRO_PER_CENT


def unit_micro_cents(price_major: Decimal, per_units: int) -> int:
    """Micro-cents per single unit for a price in the major unit per ``per_units`` units; exact or ValueError."""
    if per_units <= 0:
        raise ValueError("per_units must be positive")
    if not price_major.is_finite() or price_major < 0:
        raise ValueError(f"price {price_major} must be finite and non-negative")
    micro = Fraction(price_major) * MICRO_PER_MAJOR / per_units
    if micro.denominator != 1:
        raise ValueError(f"price {price_major} per {per_units:,} is not a whole number of micro-cents per unit")
    return micro.numerator
