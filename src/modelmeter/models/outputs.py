"""What a forward pass answers per row, without torch (fronts import it): a classifier's probabilities by label,
an embedding's floats, or a tagger's probabilities per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

TOKEN_CLASSIFICATION = "token-classification"  # noqa: S105 (a task name, not a secret)


@dataclass(frozen=True, slots=True, eq=False)
class TokenScores:
    """A tagger row: softmax probabilities over ``labels`` for every token of the row (special tokens included),
    float32 ``[tokens, len(labels)]``, in the order the row's ids were sent."""

    labels: tuple[str, ...]
    scores: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or self.scores.shape[1] != len(self.labels):
            raise ValueError(f"token scores of shape {self.scores.shape} for {len(self.labels)} labels")


Result: TypeAlias = dict[str, float] | list[float] | TokenScores
