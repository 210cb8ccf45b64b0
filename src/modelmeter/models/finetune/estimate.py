"""A job's billable training tokens before it runs (torch-free: the API counts them against the quota)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from modelmeter.models.text import TextEncoder

TRAINING_MAX_LENGTH = 128  # what training truncates rows to (train.py's default max_length)


def estimate_training_tokens(base_model_dir: Path, texts: list[str], n_epochs: int,
                             max_length: int = TRAINING_MAX_LENGTH) -> int:
    """Every row's tokens (special tokens included, after truncation, as training counts them) times the epochs.
    An upper bound when a hold-out is split off."""
    encoder = TextEncoder.load(base_model_dir, max_length=max_length)
    return encoder.tokenize(texts, truncate=True).total_tokens * n_epochs


def epoch_tokens(base_model_dir: Path, texts: list[str], max_length: int = TRAINING_MAX_LENGTH) -> int:
    """One epoch's training tokens of ``texts`` under the base's tokenizer (what a file keeps)."""
    return estimate_training_tokens(base_model_dir, texts, 1, max_length)


@functools.lru_cache(maxsize=64)
def tokenizer_fingerprint(base_model_dir: Path, max_length: int = TRAINING_MAX_LENGTH) -> str:
    """Which counts a file's kept count is valid for: the tokenizer's bytes and the training length."""
    digest = hashlib.sha256((base_model_dir / "tokenizer.json").read_bytes())
    return f"{digest.hexdigest()[:16]}:{max_length}"
