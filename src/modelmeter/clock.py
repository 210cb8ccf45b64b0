"""The platform's clock: Unix seconds, replaceable in tests to cross period boundaries."""

from __future__ import annotations

import time
from collections.abc import Callable

_source: Callable[[], float] = time.time


def now() -> float:
    """Current Unix time in seconds (float)."""
    return _source()


def now_s() -> int:
    """Current Unix time in whole seconds, the unit of every stored timestamp."""
    return int(_source())


def set_source(source: Callable[[], float] | None) -> None:
    """Replace the clock (``None`` restores the wall clock). For tests and simulations."""
    global _source
    _source = source or time.time
