"""The optimisation loop of a fine-tuning run, whatever it trains: AdamW with linear warmup and decay,
cross-entropy (per row, or per token for a tagger), gradient clipping, mixed precision where the device has it,
and progress reports. ``train.run_training`` drives it; batches come from length-sorted pools of shuffled
examples (``batches``), padded only to their longest row.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from modelmeter.models.finetune.batches import length_bucketed_batches
from modelmeter.models.finetune.hparams import DEFAULT_BATCH_SIZE, DEFAULT_LEARNING_RATE_MULTIPLIER, DEFAULT_N_EPOCHS
from modelmeter.models.finetune.recipes import TrainingType

IGNORE = -100  # a token whose label is not scored (a tagger's special tokens and continuation sub-tokens)
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


class Cancelled(Exception):
    """Training stopped because ``should_stop()`` returned true; nothing was saved."""


def _never() -> bool:
    return False


def _raise_if_stopped(stop: Callable[[], bool]) -> None:
    if stop():
        raise Cancelled("training cancelled")


@dataclass
class Hyperparameters:
    """Training hyperparameters as the fine-tuning API exposes them."""

    n_epochs: int = DEFAULT_N_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate_multiplier: float = DEFAULT_LEARNING_RATE_MULTIPLIER

    def __post_init__(self) -> None:
        if self.n_epochs < 1 or self.batch_size < 1 or not self.learning_rate_multiplier > 0:
            raise ValueError(f"hyperparameters must be positive: {self}")

    def learning_rate(self, training: TrainingType) -> float:
        """The peak learning rate: the training type's base rate times the multiplier."""
        return training.base_learning_rate * self.learning_rate_multiplier


@dataclass
class Progress:
    """A training progress report; ``loss`` is the mean training loss since the previous report."""

    epoch: int
    n_epochs: int
    step: int
    total_steps: int
    loss: float
    examples_per_s: float
    eta_s: float


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device) -> torch.autocast:
    dtype = _amp_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _collate(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


class Trainer:
    """The optimisation loop: one object so the many pieces of training state travel together."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        device: torch.device,
        hparams: Hyperparameters,
        seed: int,
        pad_id: int,
        learning_rate: float,
        per_token: bool = False,
    ) -> None:
        self.model = model
        self.per_token = per_token  # targets are a label per token (-100: not scored), not one per row
        self.device = device
        self.hparams = hparams
        self.rng = random.Random(seed)
        self.pad_id = pad_id
        self.amp_dtype = _amp_dtype(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # The fused kernel updates all parameters in one pass: on CPU it makes the optimizer step about
        # 5x cheaper, a sizeable share of a step for a small model whose embedding matrix is most weights.
        fused = device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(_param_groups(model), lr=learning_rate, fused=fused or None)

    def fit(
        self,
        encoded: list[list[int]],
        targets: Sequence[int | list[int]],
        *,
        stop: Callable[[], bool],
        on_progress: Callable[[Progress], None] | None,
        progress_every: int,
        show_progress: bool,
    ) -> float:
        """Train for ``n_epochs``; return the seconds spent in the loop."""
        n_epochs = self.hparams.n_epochs
        total = n_epochs * math.ceil(len(encoded) / self.hparams.batch_size)
        scheduler = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]  # transformers is untyped
            self.optimizer, round(total * WARMUP_FRACTION), total)
        meter = _Meter(total_steps=total, n_epochs=n_epochs, every=progress_every, callback=on_progress)
        lengths = [len(row) for row in encoded]
        self.model.train()
        bar = tqdm(total=total, desc="fine-tuning", unit="step", file=sys.stderr, disable=not show_progress)
        with bar:
            for epoch in range(1, n_epochs + 1):
                for batch in length_bucketed_batches(lengths, self.hparams.batch_size, self.rng):
                    _raise_if_stopped(stop)
                    loss = self._step([encoded[i] for i in batch], [targets[i] for i in batch])
                    scheduler.step()
                    meter.record(epoch=epoch, n_examples=len(batch), loss=loss, bar=bar)
        return meter.elapsed()

    def _step(self, rows: list[list[int]], targets: list[Any]) -> torch.Tensor:
        inputs = _collate(rows, self.pad_id, self.device)
        with _autocast(self.device):
            logits = self.model(**inputs).logits
        if self.per_token:  # [rows, width, labels] against each token's label, padding ignored
            width = logits.shape[1]
            gold = torch.tensor([t + [IGNORE] * (width - len(t)) for t in targets], dtype=torch.long,
                                device=self.device)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), gold.view(-1), ignore_index=IGNORE)
        else:
            gold = torch.tensor(targets, dtype=torch.long, device=self.device)
            loss = F.cross_entropy(logits.float(), gold)
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]  # torch types backward() loosely
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    # Biases and LayerNorm weights (the 1-d parameters) are conventionally exempt from weight decay.
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class _Meter:
    """Counts steps and examples; reports a :class:`Progress` every ``every`` steps and at the last one."""

    def __init__(
        self, *, total_steps: int, n_epochs: int, every: int, callback: Callable[[Progress], None] | None
    ) -> None:
        self.total_steps, self.n_epochs, self.callback = total_steps, n_epochs, callback
        self.every = max(every, 1)
        self.started = time.perf_counter()
        self.step = self.examples = self.window_steps = 0
        self.window_loss: torch.Tensor | float = 0.0

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def record(self, *, epoch: int, n_examples: int, loss: torch.Tensor, bar: tqdm[Any]) -> None:
        self.step += 1
        self.examples += n_examples
        # Summed as a tensor: reading it back every step would synchronise with the GPU each time.
        self.window_loss = self.window_loss + loss
        self.window_steps += 1
        bar.update(1)
        if self.step % self.every == 0 or self.step == self.total_steps:
            self._report(epoch, bar)

    def _report(self, epoch: int, bar: tqdm[Any]) -> None:
        elapsed = self.elapsed()
        mean_loss = float(self.window_loss) / self.window_steps
        self.window_loss, self.window_steps = 0.0, 0
        bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=f"{epoch}/{self.n_epochs}")
        if self.callback is not None:
            self.callback(
                Progress(
                    epoch=epoch,
                    n_epochs=self.n_epochs,
                    step=self.step,
                    total_steps=self.total_steps,
                    loss=mean_loss,
                    examples_per_s=self.examples / elapsed,
                    eta_s=elapsed / self.step * (self.total_steps - self.step),
                )
            )


