"""Length-bucketed training batches: shuffled examples drawn in pools, sorted by length within each pool, so a
batch pads only to its own longest row (this matters most on the CPU)."""

from __future__ import annotations

import random

# Batches per length-sorted pool: large enough that rows in a batch have similar lengths, small enough
# that the order stays well shuffled.
POOL_BATCHES = 50


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of row indices: shuffled, length-sorted within pools, in shuffled order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * POOL_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
