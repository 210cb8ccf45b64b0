"""What a fine-tune trains and how it is saved: a LoRA adapter on the frozen base (the default) or a full copy.

A LoRA fine-tune trains low-rank updates of the base encoder's linear layers (PEFT's ``LoraConfig``) plus its
own classification head, and saves only those: ``adapter_model.safetensors`` and ``adapter_config.json`` as
PEFT writes them, and :data:`~modelmeter.models.adapters.artifact.ADAPTER_META` with the labels. The serving
side (:mod:`modelmeter.models.adapters`) computes many such adapters in one forward pass over the shared base.
A full fine-tune saves a whole ``BertForSequenceClassification`` with its tokenizer, as round 1 did. A tagger
(named entities) is the same with ``BertForTokenClassification``: a per-token head, ``task`` in the meta.

The defaults (rank, alpha, targets, learning rate) were chosen by measurement: ``bench/finetune.py``, with the
table in the README.
"""

from __future__ import annotations

import json
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from modelmeter.models.adapters.artifact import ADAPTER_CONFIG, ADAPTER_META, META_FORMAT, SERVED_TARGETS
from modelmeter.models.finetune.hparams import (
    DEFAULT_LORA_ALPHA,
    DEFAULT_LORA_RANK,
    FULL_BASE_LEARNING_RATE,
    LORA_BASE_LEARNING_RATE,
    LORA_DROPOUT,
    MAX_LORA_RANK,
)

# Every linear layer of the encoder and the pooler ("dense" matches the attention output, intermediate, output
# and pooler projections); the classifier is trained whole beside the adapter (PEFT's modules_to_save).
LORA_TARGETS: tuple[str, ...] = SERVED_TARGETS


@dataclass(frozen=True)
class FullTraining:
    """Every weight of the base is trained; the result is a full model copy."""

    type: ClassVar[Literal["full"]] = "full"
    base_learning_rate: float = FULL_BASE_LEARNING_RATE

    def public(self) -> dict[str, Any]:
        return {"type": "full"}


@dataclass(frozen=True)
class LoraTraining:
    """Low-rank updates of the base's linear layers plus a classification head; the base stays frozen."""

    type: ClassVar[Literal["lora"]] = "lora"
    rank: int = DEFAULT_LORA_RANK
    alpha: int = DEFAULT_LORA_ALPHA
    dropout: float = LORA_DROPOUT
    target_modules: tuple[str, ...] = field(default=LORA_TARGETS)
    base_learning_rate: float = LORA_BASE_LEARNING_RATE

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= MAX_LORA_RANK or self.alpha <= 0:
            raise ValueError(f"LoRA rank must be 1-{MAX_LORA_RANK} and alpha positive: {self}")

    def public(self) -> dict[str, Any]:
        return {"type": "lora", "rank": self.rank, "alpha": self.alpha}


TrainingType = FullTraining | LoraTraining


def training_from_stored(data: dict[str, Any] | None) -> TrainingType:
    """The training type a job stored (``None``: a job from before adapters existed, trained in full)."""
    if data is None or data.get("type") == "full":
        return FullTraining()
    if data.get("type") == "lora":
        return LoraTraining(rank=int(data.get("rank", DEFAULT_LORA_RANK)),
                            alpha=int(data.get("alpha", DEFAULT_LORA_ALPHA)))
    raise ValueError(f"unknown training type {data!r}")


def prepare(model: torch.nn.Module, training: TrainingType, *, task: str = "text-classification") -> torch.nn.Module:
    """The module to optimise: the model itself (full), or a PEFT model whose only trainable weights are the
    LoRA factors and the head (a ``BertForSequenceClassification``'s, or with ``task="token-classification"`` a
    ``BertForTokenClassification``'s, which tags every token)."""
    if isinstance(training, FullTraining):
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.TOKEN_CLS if task == "token-classification" else TaskType.SEQ_CLS
    config = LoraConfig(task_type=task_type, r=training.rank, lora_alpha=training.alpha,
                        lora_dropout=training.dropout, target_modules=list(training.target_modules),
                        modules_to_save=["classifier"])
    with warnings.catch_warnings():
        # transformers 5 deprecates an attribute PEFT still reads; nothing for us to act on.
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    _share_dropouts(peft_model, training.dropout)
    return peft_model


class SharedDropout(torch.nn.Module):
    """Inverted dropout for the LoRA branches: the mask costs one random 64-bit word per 8 elements, and branches
    that receive the same input tensor (query, key and value see the same hidden states) share it.

    PEFT gives every LoRA branch its own ``nn.Dropout``, which draws one random number per element: on the CPU,
    those draws cost more than the rest of the LoRA overhead (a training step on 32 SST-2 sentences: 620-650 ms with
    them against 440-450 without dropout, and 460-570 for a full fine-tune; ``F.dropout`` on a [32, 28, 1536]
    tensor 9.5 ms, this mask 3.2 ms). ``p`` is applied in steps of 1/256 (0.1 is 26/256). LoRA with dropout scores
    about half a point better than without on 2,000 held-out SST-2 rows (README), and with this module trains no
    slower than a full fine-tune.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.threshold = round(p * 256)
        self.scale = 256 / (256 - self.threshold)
        # Weak references: the autograd graph keeps both alive for the step; nothing is retained after it.
        self._last: tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if self._last is not None and self._last[0]() is x:  # the same tensor object: q, k and v of one layer
            out = self._last[1]()
            if out is not None:
                return out
        out = x * _keep_mask(x, self.threshold) * self.scale
        self._last = (weakref.ref(x), weakref.ref(out))
        return out


def _keep_mask(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """``True`` with probability ``1 - threshold / 256`` per element, from uniform random bytes."""
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
    return words.view(torch.uint8)[:n].view(x.shape) >= threshold


def _share_dropouts(model: torch.nn.Module, p: float) -> None:
    from peft.tuners.lora import LoraLayer

    shared: dict[str, SharedDropout] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_dropout:
            parent, _, leaf = name.rpartition(".")
            key = parent if leaf in ("query", "key", "value") else name
            module.lora_dropout["default"] = shared.setdefault(key, SharedDropout(p))


def save(module: torch.nn.Module, tokenizer: Any, training: TrainingType, *, labels: list[str], base_model: str,
         directory: Path, task: str = "text-classification") -> None:
    """Write the trained artifact into ``directory`` (safetensors only)."""
    if isinstance(training, FullTraining):
        module.save_pretrained(directory, safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(directory)
        return
    # The embeddings are frozen: nothing to save there, and PEFT would otherwise look the base up on a hub.
    module.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)  # type: ignore[operator]
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub says nothing about this adapter
    config_path = directory / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model  # the platform's model id, not this machine's path
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    meta = {"format": META_FORMAT, "task": task, "base_model": base_model, "labels": labels, "rank": training.rank,
            "alpha": training.alpha, "target_modules": list(training.target_modules)}
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
