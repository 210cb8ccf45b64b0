"""Following a fine-tuning job on the terminal: its events as lines, its training steps as a progress bar.

Shared by ``modelmeter jobs events --follow`` and ``modelmeter quickstart``. The job and its events come from a
``poll(after_seq)`` function (the database through the service functions, in both commands), so the display
knows nothing of where they are kept.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import click
from tqdm import tqdm

from modelmeter.models.finetune.tables import FineTuningEventPublic, FineTuningJobPublic

FINISHED = ("succeeded", "failed", "cancelled")

# poll(after_seq) -> (the job, its events after event number ``after_seq``, oldest first), both in public form
Poll = Callable[[int], tuple[FineTuningJobPublic, list[FineTuningEventPublic]]]


def event_seq(event: FineTuningEventPublic) -> int:
    return int(event.id.removeprefix("ftevent_"))


def event_line(event: FineTuningEventPublic) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.created_at))
    level = "" if event.level == "info" else f"[{event.level}] "
    return f"{stamp}  {level}{event.message}"


class ProgressDisplay:
    """Events as lines on ``out``; ``metrics`` events move a bar on stderr (when it is a terminal, unless told),
    or are printed as lines like the others."""

    def __init__(self, *, bar: bool | None = None, out: IO[str] | None = None, as_json: bool = False) -> None:
        self.as_json = as_json
        self.use_bar = (sys.stderr.isatty() if bar is None else bar) and not as_json
        self.out = out
        self.bar: tqdm[Any] | None = None

    def show(self, event: FineTuningEventPublic) -> None:
        if self.as_json:
            click.echo(json.dumps(event.model_dump(mode="json")), file=self.out)  # as the API's list writes it
            return
        if event.type == "metrics" and self.use_bar:
            self._advance(event.data)
            return
        if self.bar is not None:
            self.bar.clear()
        click.echo(event_line(event), file=self.out)
        if self.bar is not None:
            self.bar.refresh()

    def _advance(self, data: dict[str, Any]) -> None:
        total, step = int(data.get("total_steps") or 0), int(data.get("step") or 0)
        if self.bar is None:
            # Rate and time left are the worker's (from the event), not the bar's: events come in bursts.
            self.bar = tqdm(total=total or None, desc="fine-tuning", unit="step", file=sys.stderr,
                            dynamic_ncols=True, leave=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix}")
        self.bar.n = step
        self.bar.set_postfix_str(
            f"epoch {data.get('epoch', '?')}, loss {data.get('train_loss', float('nan')):.4f}, "
            f"{data.get('examples_per_s', 0):.0f} examples/s, {data.get('eta_s', 0):.0f} s left", refresh=False)
        self.bar.refresh()

    def close(self, job: FineTuningJobPublic | None = None) -> None:
        if self.bar is not None:
            if job is not None and job.status == "succeeded" and self.bar.total:
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.bar.close()
            self.bar = None


def follow_job(poll: Poll, display: ProgressDisplay, *, interval_s: float = 1.0, after_seq: int = 0,
               on_poll: Callable[[FineTuningJobPublic], None] | None = None) -> FineTuningJobPublic:
    """Show the job's events (from ``after_seq`` on) as they come until it has finished; the finished job.

    ``on_poll(job)`` runs after every poll (e.g. to check that something will train a queued job)."""
    try:
        while True:
            job, events = poll(after_seq)
            for event in events:
                display.show(event)
                after_seq = max(after_seq, event_seq(event))
            if job.status in FINISHED:
                if events:  # perhaps more than one poll's worth: read on until none is left
                    continue
                display.close(job)
                return job
            if on_poll is not None:
                on_poll(job)
            time.sleep(interval_s)
    finally:
        display.close()
