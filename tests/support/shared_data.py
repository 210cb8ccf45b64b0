"""The data sets tests share with the benchmarks, outside the repository: ``../shared/data`` beside it (as sessions
and CI lay it out), or the folder MODELMETER_SHARED_DATA names. Tests reach it through the ``shared_data`` fixture,
which skips them, all with one reason, when it is absent."""

from __future__ import annotations

import os
import random
from pathlib import Path

ENV = "MODELMETER_SHARED_DATA"
# What the tests read from it (checked up front, so a partial copy skips rather than failing half-way).
REQUIRED = ("sst2/train.tsv", "conll2003/train.jsonl")


def shared_data_dir() -> Path:
    """MODELMETER_SHARED_DATA; else ``data/`` in MODELMETER_SHARED_DIR (the README's older name); else
    ``../shared/data`` beside the repository."""
    if override := os.environ.get(ENV):
        return Path(override)
    if shared := os.environ.get("MODELMETER_SHARED_DIR"):
        return Path(shared) / "data"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def missing_reason(data: Path) -> str | None:
    """Why ``data`` will not do (one sentence naming what is missing), or None when it has all the tests read."""
    missing = [name for name in REQUIRED if not (data / name).is_file()]
    if not missing:
        return None
    return f"the shared data is absent: {data} lacks {', '.join(missing)} (set {ENV} to the folder that has them)"


def sst2_rows(data: Path, n: int, *, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` shuffled (sentence, label) rows of SST-2's training split in ``data`` (the ``shared_data`` fixture)."""
    lines = (data / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [(s, int(label)) for s, label in (line.rsplit("\t", 1) for line in lines)]
    random.Random(seed).shuffle(rows)
    return rows[:n]
