"""The money module: exact half-up rounding and each text form amounts are shown in (the forms differ on purpose)."""

from __future__ import annotations

import ast
import re
from decimal import Decimal
from pathlib import Path

import pytest

from modelmeter import money


@pytest.mark.parametrize(("micro", "cents"), [(0, 0), (499_999, 0), (500_000, 1), (1_499_999, 1), (1_500_000, 2),
                                              (-500_000, -1), (-499_999, 0), (-1_500_000, -2)])
def test_micro_to_cents_rounds_halves_away_from_zero(micro: int, cents: int) -> None:
    assert money.micro_to_cents(micro) == cents


def test_quantize_half_up_keeps_places_and_sign() -> None:
    assert str(money.quantize_half_up(1, 4, places=4)) == "0.2500"
    assert str(money.quantize_half_up(1, 8, places=2)) == "0.13"
    assert money.decimal_text(money.quantize_half_up(-1, 100_000, places=4)) == "-0.0000"


def test_text_forms() -> None:
    assert money.amount_text(123_456, "usd") == "$1,234.56"
    assert money.amount_text(-5, "eur") == "-€0.05"
    assert money.amount_text(300, "chf") == "CHF 3.00"
    assert money.cent_text(12) == "12¢"
    assert money.cent_text("0.002") == "0.002¢"
    assert money.cents_text(952_000) == "0.952"
    assert money.cents_text(100_000_000) == "100"
    assert money.cents_text(0) == "0"
    tiny = money.cents_decimal(373_357, exponent=-12)
    assert money.decimal_text(tiny) == "0.000000373357"
    assert money.decimal_text(tiny, exponent=True) == "3.73357E-7"  # what invoices store and show
    assert money.price_text(Decimal("0.002")) == "0.002"
    assert money.price_text(Decimal("0.002"), min_places=4) == "0.0020"
    assert money.price_text(Decimal("0.000025"), min_places=4) == "0.000025"


@pytest.mark.parametrize(("cents", "currency", "shown"), [
    ("4773.77158004779", "usd", "$47.74"),  # a base fee prorated by the second: reads as the line's amount
    ("0.002", "usd", "0.002¢"),  # per token
    ("0.05", "usd", "0.05¢"),  # per request
    ("0.0008", "usd", "0.0008¢"),  # a token tier's price per token
    ("0.000125", "usd", "0.000125¢"),  # per training token
    ("0.0000123456789", "usd", "0.0000123457¢"),  # six significant digits, half up
    ("0.00000123456749", "usd", "0.00000123457¢"),
    ("12.3456749", "usd", "12.3457¢"),
    ("12.34565", "usd", "12.3457¢"),  # the half rounds up
    ("12.34564999", "usd", "12.3456¢"),
    ("3.73357E-7", "usd", "0.000000373357¢"),  # as invoices may store it: never exponent notation
    ("1234567.891", "usd", "$12,345.68"),
    ("100", "usd", "$1.00"),
    ("99.9999999", "usd", "$1.00"),  # six significant digits reach a whole number of cents: an amount
    ("4.9999999", "usd", "$0.05"),
    ("5", "usd", "$0.05"),  # whole cents are an amount
    ("200", "usd", "$2.00"),  # a tier's flat fee
    ("0", "usd", "$0.00"),
    ("0.000", "usd", "$0.00"),
    ("-25", "usd", "-$0.25"),  # credits applied
    ("-4773.775", "usd", "-$47.74"),  # halves away from zero, like micro_to_cents
    ("-0.0025", "usd", "-0.0025¢"),
    ("4773.77158004779", "eur", "€47.74"),
    ("4773.77158004779", "chf", "CHF 47.74"),
    ("-25", "gbp", "-£0.25"),
    ("0.002", "chf", "0.002¢"),
])
def test_unit_price_text(cents: str, currency: str, shown: str) -> None:
    assert money.unit_price_text(cents, currency) == shown
    assert money.unit_price_text(Decimal(cents), currency) == shown


def test_unit_price_text_takes_integers_and_refuses_non_numbers() -> None:
    assert money.unit_price_text(49_900, "usd") == "$499.00"
    for bad in ("NaN", "Infinity"):
        with pytest.raises(ValueError, match="not a finite number"):
            money.unit_price_text(bad, "usd")


@pytest.mark.parametrize(("major", "shown"), [("0.0005", "0.05¢"), ("0.0200", "$0.02"), ("0.0080", "0.8¢"),
                                              ("2.0000", "$2.00"), ("0.0000", "$0.00"), ("0.00001", "0.001¢"),
                                              ("1.23456789", "$1.23")])
def test_major_price_text(major: str, shown: str) -> None:
    assert money.major_price_text(Decimal(major), "usd") == shown


@pytest.mark.parametrize(("value", "digits", "rounded"), [("0.0000123456789", 6, "0.0000123457"),
                                                          ("4773.77158004779", 6, "4773.77"), ("0", 6, "0"),
                                                          ("-0.125", 2, "-0.13"), ("999999.5", 6, "1000000")])
def test_significant_half_up(value: str, digits: int, rounded: str) -> None:
    assert money.decimal_text(money.significant_half_up(Decimal(value), digits)) == rounded


def test_money_is_foundation_and_float_free() -> None:
    source = Path(money.__file__).read_text()
    assert not re.search(r"float\(|:\s*float\b|->\s*float\b", source)
    imported = [n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m and m.startswith("modelmeter")]
