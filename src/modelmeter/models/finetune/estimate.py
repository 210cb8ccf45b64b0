"""A job's billable training tokens before it runs (torch-free: the API counts them against the quota)."""

from __future__ import annotations

from pathlib import Path

from modelmeter.models.text import TextEncoder

TRAINING_MAX_LENGTH = 128  # what training truncates rows to (train.py's default max_length)


def estimate_training_tokens(base_model_dir: Path, texts: list[str], n_epochs: int,
                             max_length: int = TRAINING_MAX_LENGTH) -> int:
    """Every row's tokens (special tokens included, after truncation, as training counts them) times the epochs.
    An upper bound when a hold-out is split off."""
    encoder = TextEncoder.load(base_model_dir, max_length=max_length)
    return encoder.tokenize(texts, truncate=True).total_tokens * n_epochs
