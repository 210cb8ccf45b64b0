"""A fake forward pass for the batcher's tests: each row's result is its ids; it records every batch's rows and
tags, can be held inside a batch, and a row holding ``POISON`` fails its batch."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

POISON = -1


@dataclass
class Model:
    """A fake forward pass: each input's result is its ids as a tuple; records every batch it ran.

    ``hold()`` makes the next batch block inside ``run`` until ``release()``, so tests can queue work
    behind a batch that is computing. An input containing ``POISON`` makes its batch raise.
    """

    batches: list[list[list[int]]] = field(default_factory=list)
    tags: list[list[Any]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        self.gate.set()

    def __call__(self, ids: list[list[int]], tags: list[Any] | None = None) -> list[tuple[int, ...]]:
        self.batches.append(ids)
        self.tags.append(list(tags or []))
        self.entered.set()
        self.gate.wait(timeout=5)
        time.sleep(self.delay_s)
        if any(POISON in row for row in ids):
            raise ValueError("poisoned batch")
        return [tuple(row) for row in ids]

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self.gate.set()

    def computed(self) -> list[list[int]]:
        return [row for batch in self.batches for row in batch]

    def kinds(self) -> list[list[str]]:
        """Each batch's rows as "low" / "int" (the priority tests' tags start with the request's kind)."""
        return [[str(tag).split("-")[0] for tag in tags] for tags in self.tags]
