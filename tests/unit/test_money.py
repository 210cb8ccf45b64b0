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


def test_money_is_foundation_and_float_free() -> None:
    source = Path(money.__file__).read_text()
    assert not re.search(r"float\(|:\s*float\b|->\s*float\b", source)
    imported = [n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m and m.startswith("modelmeter")]
