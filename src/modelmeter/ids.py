"""Object ids: ``<prefix>_<time><random>``, lowercase base36, so ids sort by creation in any collation."""

from __future__ import annotations

import os
import random
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)  # forked workers must not repeat their parent's sequence


def fixed_width(value: int, width: int, alphabet: str = _ALPHABET) -> str:
    """``value`` in base ``len(alphabet)``, most significant digit first, in exactly ``width`` digits (the value
    taken modulo the base to the width)."""
    base = len(alphabet)
    out = []
    for _ in range(width):
        value, digit = divmod(value, base)
        out.append(alphabet[digit])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """A new time-ordered id such as ``ten_0mf3k2x9a8c4hx0q2b7d``."""
    millis = time.time_ns() // 1_000_000
    # Ids must be unique, not secret (secrets such as API keys come from ``secrets``): the per-process generator
    # (seeded from the OS, re-seeded in forked children) avoids a syscall, which gives the GIL away on the hot path.
    rand = fixed_width(_random.getrandbits(62), 12)
    return f"{prefix}_{fixed_width(millis, 9)}{rand}"
