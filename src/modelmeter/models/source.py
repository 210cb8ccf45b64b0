"""Where a model's artifacts are, as the registry resolved them (never from a request); torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's artifacts are; ``base`` is set for a LoRA adapter (the base it runs on)."""

    model_id: str
    path: Path
    task: str
    base: ModelSource | None = None
