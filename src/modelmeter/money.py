"""Money: its units, exact conversion and rounding, and the text forms amounts are shown in.

Units
    Amounts are integer cents (the currency's minor unit, taken to be 1/100 of the major unit); exact prices
    and costs are integer micro-cents (1e-6 cent). Plan prices are ``Decimal`` in the major unit.

Rounding
    Half-up, never banker's: :func:`round_half_up_div` and :func:`micro_to_cents` on exact integers,
    :func:`quantize_half_up` to a number of decimal places. Nothing here touches a float.

Text (one function per form; the forms differ on purpose, callers pick theirs)
    ``amount_text``   integer cents for people: ``$1,234.56``, ``-€0.05``, ``CHF 3.00``
    ``cent_text``     a number of cents with the cent sign: ``12¢``, ``0.002¢``
    ``decimal_text``  a ``Decimal`` positionally (``0.000000373357``), or as ``str()`` writes it, which switches to
                      exponent notation below 1e-6 (``3.73357E-7``)
    ``cents_text``    exact micro-cents as a decimal string of cents without trailing zeros: ``0.952``, ``100``
    ``price_text``    a price in the major unit: as written, or with at least ``min_places`` decimals
    ``unit_price_text``   a unit price in cents for people (the display form below): ``$47.74``, ``0.002¢``
    ``major_price_text``  the same for a price given in the major unit (plan prices, tier prices)

Display form (every page and CLI table people read; JSON, CSV and Stripe keep the exact forms above)
    An amount of money is integer cents in the major unit with two decimals, by ``amount_text``: ``$1,234.56``,
    ``-$0.25``. A unit price may be a fraction of a cent (``0.002`` cents per token) or an exact quotient (a base
    fee prorated by the second, ``4773.77158004779`` cents), so ``unit_price_text`` picks its form by size:

    - a whole number of cents, or one major unit (100 cents) and more: as an amount, rounded half-up to the cent
      (``5`` -> ``$0.05``, ``200`` -> ``$2.00``, ``4773.77158004779`` -> ``$47.74``: on a quantity-1 line the
      unit price then reads as the line's amount);
    - below one major unit with a fraction of a cent: cents with the cent sign, rounded half-up to at most
      ``DISPLAY_DIGITS`` (6) significant digits, without trailing zeros (``0.002¢``, ``0.05¢``, ``12.3457¢``,
      ``0.0000123457¢``); when that rounding reaches a whole number of cents it is shown as an amount
      (``4.9999999`` -> ``$0.05``).

    Halves round away from zero, so a negative price is the positive one with a minus sign. The rounding is for
    reading only: billing keeps exact micro-cents and invoices keep the exact ``unit_amount_decimal``.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal
from fractions import Fraction

MICRO_PER_CENT = 1_000_000
CENTS_PER_MAJOR = 100
DISPLAY_DIGITS = 6  # significant digits of a sub-cent unit price on a page or a CLI table
MICRO_PER_MAJOR = 100 * MICRO_PER_CENT
CENT_SIGN = "¢"
_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£"}


# --- exact conversion and rounding ----------------------------------------------------------------------


def round_half_up_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half-up to an integer, exactly (both non-negative)."""
    if numerator < 0 or denominator <= 0:
        raise ValueError("round_half_up_div needs numerator >= 0 and denominator > 0")
    return (2 * numerator + denominator) // (2 * denominator)


def micro_to_cents(micro: int) -> int:
    """Micro-cents rounded half-up (halves away from zero) to integer cents, exactly."""
    if micro < 0:
        return -round_half_up_div(-micro, MICRO_PER_CENT)
    return round_half_up_div(micro, MICRO_PER_CENT)


def quantize_half_up(numerator: int, denominator: int, *, places: int) -> Decimal:
    """``numerator / denominator`` as a ``Decimal`` (context precision) rounded half-up to ``places`` decimals.

    The result keeps its trailing zeros: ``quantize_half_up(1, 4, places=4)`` is ``0.2500``.
    """
    exact = Decimal(numerator) / Decimal(denominator)
    return exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


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


def plain(value: Decimal) -> Decimal:
    """The same number without trailing zeros or a positive exponent: 0.002000 -> 0.002, 2E+1 -> 20."""
    if value == 0:
        return Decimal(0)
    normal = value.normalize(Context(prec=len(value.as_tuple().digits)))
    return Decimal(int(normal)) if normal == normal.to_integral_value() else normal


def cents_decimal(scaled: int, *, exponent: int = -6) -> Decimal:
    """``scaled`` x 10^``exponent`` cents as an exact, :func:`plain` ``Decimal`` (micro-cents by default)."""
    return plain(Decimal(f"{scaled}e{exponent}"))


# --- text ------------------------------------------------------------------------------------------------


def decimal_text(value: Decimal, *, exponent: bool = False) -> str:
    """A decimal as text: positional digits, or with ``exponent`` as ``str()`` writes it (E-notation below 1e-6)."""
    return str(value) if exponent else format(value, "f")


def cents_text(micro: int) -> str:
    """Exact micro-cents as a decimal string of cents, without trailing zeros: 952_000 -> ``0.952``."""
    return decimal_text(cents_decimal(micro))


def amount_text(cents: int, currency: str) -> str:
    """Integer cents as ``$1,234.56`` (known symbols; otherwise the upper-case code and a space; no float)."""
    whole, part = divmod(abs(cents), 100)
    symbol = _SYMBOLS.get(currency, currency.upper() + " ")
    return f"{'-' if cents < 0 else ''}{symbol}{whole:,}.{part:02d}"


def cent_text(value: int | str) -> str:
    """A number of cents (an integer or a decimal string) with the cent sign: ``12¢``."""
    return f"{value}{CENT_SIGN}"


def price_text(value: Decimal, *, min_places: int | None = None) -> str:
    """A price in the major unit: positionally as written, or padded to ``min_places`` decimals when it has no
    more than that (``0.002`` -> ``0.0020``) and otherwise without trailing zeros."""
    if min_places is None:
        return format(value, "f")
    if value == value.quantize(Decimal(1).scaleb(-min_places)):
        return f"{value:.{min_places}f}"
    return format(value.normalize(), "f")


def significant_half_up(value: Decimal, digits: int) -> Decimal:
    """``value`` rounded half-up (halves away from zero) to ``digits`` significant digits: 0.0000123456789, 6 ->
    0.0000123457."""
    if digits <= 0:
        raise ValueError("digits must be positive")
    if value == 0:
        return Decimal(0)
    return value.quantize(Decimal(1).scaleb(value.adjusted() - digits + 1), rounding=ROUND_HALF_UP)


def unit_price_text(cents: Decimal | int | str, currency: str) -> str:
    """A unit price in cents (exact, possibly a fraction of a cent) in the display form: as an amount when it is a
    whole number of cents or at least one major unit (``$47.74``), else in cents to at most ``DISPLAY_DIGITS``
    significant digits (``0.002¢``). See the module's docstring."""
    value = Decimal(cents)
    if not value.is_finite():
        raise ValueError(f"unit price {cents!r} is not a finite number")
    if abs(value) >= CENTS_PER_MAJOR or value == value.to_integral_value():
        return amount_text(int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP)), currency)
    shown = significant_half_up(value, DISPLAY_DIGITS)
    if shown == shown.to_integral_value():
        return amount_text(int(shown), currency)
    return cent_text(decimal_text(plain(shown)))


def major_price_text(price: Decimal, currency: str) -> str:
    """A price given in the major unit (a plan's ``0.0005`` dollars per request) in the display form of
    :func:`unit_price_text` (``0.05¢``)."""
    return unit_price_text(price.scaleb(2), currency)
