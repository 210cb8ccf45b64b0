"""A device that waits instead of computing (``MODELMETER_SIMULATED_DEVICE=batch_ms=1,row_us=2``).

Each forward pass becomes a sleep of ``batch_ms + rows * row_us`` and returns deterministic outputs of the right
shapes (class scores over the model's labels, unit vectors of its width, a tagger's scores per token), so the
fronts and the batching across
them can be measured on a machine without the accelerator they would feed. Never a default.
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from modelmeter.models.outputs import TOKEN_CLASSIFICATION, Result, TokenScores


@dataclass(frozen=True, slots=True)
class SimulatedDevice:
    batch_ms: float
    row_us: float

    @classmethod
    def parse(cls, spec: str) -> SimulatedDevice:
        """``batch_ms=<float>,row_us=<float>`` (either may be left out: 0)."""
        values = {"batch_ms": 0.0, "row_us": 0.0}
        for part in filter(None, (piece.strip() for piece in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in values:
                raise ValueError(f"simulated device: expected batch_ms=<float>,row_us=<float>, got {spec!r}")
            number = float(value)
            if not math.isfinite(number) or number < 0:
                raise ValueError(f"simulated device: {key.strip()} must be a non-negative number")
            values[key.strip()] = number
        return cls(values["batch_ms"], values["row_us"])

    def wait_s(self, rows: int) -> float:  # float-ok: seconds
        return self.batch_ms / 1e3 + rows * self.row_us / 1e6

    def forward(self, *, labels_of: Callable[[object], Sequence[str] | None], dimensions: int,
                task_of: Callable[[object], str] | None = None
                ) -> Callable[[list[list[int]], Sequence[object] | None], list[Result]]:
        """A forward pass for one backend: ``labels_of(tag)`` is a row's class labels (``None``: a vector row),
        ``task_of(tag)`` its task (a tagger's rows get scores per token)."""

        def run(batch_ids: list[list[int]], tags: Sequence[object] | None = None) -> list[Result]:
            time.sleep(self.wait_s(len(batch_ids)))
            row_tags = tags if tags is not None else [None] * len(batch_ids)
            return [_output(ids, labels_of(tag), dimensions, task_of(tag) if task_of else None)
                    for ids, tag in zip(batch_ids, row_tags, strict=True)]

        return run


def _output(ids: list[int], labels: Sequence[str] | None, dimensions: int, task: str | None = None) -> Result:
    seed = zlib.crc32(bytes(i & 0xFF for i in ids)) % _VARIANTS
    if labels and task == TOKEN_CLASSIFICATION:
        return TokenScores(tuple(labels), _token_scores(tuple(labels), tuple(ids)))
    if labels:
        first = seed % len(labels)
        rest = 0.1 / max(1, len(labels) - 1)
        return {label: (0.9 if i == first or len(labels) == 1 else rest) for i, label in enumerate(labels)}
    return list(_vector(seed, dimensions))  # a copy: callers may keep or change their rows


_VARIANTS = 251  # distinct outputs per shape: enough to tell rows apart, few enough to build once


@functools.lru_cache(maxsize=4 * _VARIANTS)
def _vector(seed: int, dimensions: int) -> tuple[float, ...]:
    """A unit vector per (seed, width), built once (simulated rows should cost the engine nothing to make)."""
    unit = 1.0 / math.sqrt(dimensions) if dimensions else 0.0
    return tuple(unit if (seed >> (i % 8)) & 1 else -unit for i in range(dimensions))


def _token_scores(labels: tuple[str, ...], ids: tuple[int, ...]) -> np.ndarray:
    """0.9 on one label per token, chosen by the token id (the same word tags the same way), 0.1 spread."""
    rest = 0.1 / max(1, len(labels) - 1)
    scores = np.full((len(ids), len(labels)), rest, dtype=np.float32)
    scores[np.arange(len(ids)), np.asarray(ids, dtype=np.int64) % len(labels)] = 0.9 if len(labels) > 1 else 1.0
    return scores
