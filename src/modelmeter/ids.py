"""Object ids: ``<prefix>_<time><random>``, lowercase base36, so ids sort by creation in any collation."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 36)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """A new time-ordered id such as ``ten_0mf3k2x9a8c4hx0q2b7d``."""
    millis = time.time_ns() // 1_000_000
    rand = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    return f"{prefix}_{_base36(millis, 9)}{rand}"
