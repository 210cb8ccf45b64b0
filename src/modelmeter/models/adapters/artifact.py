"""A LoRA adapter on disk, read and checked for serving: PEFT's ``adapter_model.safetensors`` and
``adapter_config.json``, plus our ``adapter_meta.json`` (labels, rank and task: a classifier's head reads the
pooled vector, a tagger's every token; an adapter from before taggers has no task and is a classifier).

Reading never imports PEFT: the serving path needs the factors as plain tensors, checked against the base's
shapes, with the LoRA scale folded into ``B`` once, here, instead of on every forward pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

ADAPTER_META = "adapter_meta.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_FORMAT = 1
# The base's linear layers an adapter may update (matched on the module name's last part, as PEFT does):
# every linear of the encoder and the pooler. "dense" covers the attention output, intermediate, output and
# pooler projections.
SERVED_TARGETS: tuple[str, ...] = ("query", "key", "value", "dense")

TASKS = ("text-classification", "token-classification")
_PREFIX = "base_model.model."
_ENCODER = "bert."
_HEAD = "classifier."


class AdapterError(Exception):
    """An adapter's files are missing, corrupt, or do not fit the base model."""


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """One adapter as host tensors: per module ``(A [rank, in], B [rank, out])`` with the scale folded into ``B``,
    and the classification head ``(W [labels, hidden], b [labels])``."""

    rank: int
    labels: tuple[str, ...]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: tuple[torch.Tensor, torch.Tensor]
    task: str = "text-classification"  # or "token-classification"

    def to(self, *, device: torch.device | None = None, dtype: torch.dtype | None = None,
           pin: bool = False) -> AdapterWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype)
            return t.pin_memory() if pin else t

        factors = {name: (move(a), move(b)) for name, (a, b) in self.factors.items()}
        return AdapterWeights(self.rank, self.labels, factors, (move(self.head[0]), move(self.head[1])), self.task)


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_META).is_file()


def read_adapter(path: Path, *, shapes: dict[str, tuple[int, int]], hidden: int) -> AdapterWeights:
    """Read the adapter in ``path`` for a base whose served linear layers have ``shapes`` (module name →
    ``(in, out)``) and whose hidden size is ``hidden``; :class:`AdapterError` says what is wrong."""
    try:
        meta = json.loads((path / ADAPTER_META).read_text())
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        tensors = load_file(path / ADAPTER_WEIGHTS, device="cpu")
    except (OSError, ValueError, RuntimeError) as exc:  # missing files, bad JSON, a corrupt safetensors header
        raise AdapterError(f"unreadable adapter files: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated or malformed files
        raise AdapterError(f"corrupt adapter weights: {type(exc).__name__}: {exc}") from exc
    rank, scale = _rank_and_scale(config)
    labels = _labels(meta)
    factors = _factors(tensors, shapes, rank, scale)
    head = _head(tensors, len(labels), hidden)
    task = meta.get("task", "text-classification")
    if task not in TASKS:
        raise AdapterError(f"{ADAPTER_META} names task {task!r}; expected one of {', '.join(TASKS)}")
    return AdapterWeights(rank, labels, factors, head, task)


def _rank_and_scale(config: dict[str, Any]) -> tuple[int, float]:
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("bias", "none") != "none":
        raise AdapterError("only plain LoRA adapters (no DoRA, no bias training) can be served")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError("per-module ranks or alphas are not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or not 1 <= rank <= 64 or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"rank must be 1-64 and alpha positive, got r={rank!r}, lora_alpha={alpha!r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scale)


def _labels(meta: dict[str, Any]) -> tuple[str, ...]:
    labels = meta.get("labels")
    if meta.get("format") != META_FORMAT or not isinstance(labels, list) or len(labels) < 2:
        raise AdapterError(f"{ADAPTER_META} must have format {META_FORMAT} and at least two labels")
    if not all(isinstance(label, str) for label in labels) or len(set(labels)) != len(labels):
        raise AdapterError("labels must be distinct strings")
    return tuple(labels)


def _factors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], rank: int,
             scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        if name.startswith(_HEAD):
            continue
        module, _, part = name.removeprefix(_ENCODER).rpartition(".lora_")
        if not name.startswith(_ENCODER) or part not in ("A.weight", "B.weight"):
            raise AdapterError(f"unexpected tensor {key!r}")
        if module not in shapes:
            raise AdapterError(f"the adapter updates {module!r}, which this server does not serve")
        found.setdefault(module, {})[part[0]] = tensor
    if not found:
        raise AdapterError("the adapter has no LoRA factors")
    return {module: _factor(module, parts, shapes[module], rank, scale) for module, parts in found.items()}


def _factor(module: str, parts: dict[str, torch.Tensor], shape: tuple[int, int], rank: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = parts.get("A"), parts.get("B")
    fan_in, fan_out = shape
    if a is None or b is None or tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
        raise AdapterError(f"{module}: factors must be A [{rank}, {fan_in}] and B [{fan_out}, {rank}]")
    a, b = a.float(), b.float()
    _check_finite(module, a, b)
    return a.contiguous(), (b.t() * scale).contiguous()


def _head(tensors: dict[str, torch.Tensor], n_labels: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = tensors.get(_PREFIX + _HEAD + "weight"), tensors.get(_PREFIX + _HEAD + "bias")
    if weight is None or bias is None or tuple(weight.shape) != (n_labels, hidden) or tuple(bias.shape) != (n_labels,):
        raise AdapterError(f"the classification head must be [{n_labels}, {hidden}] with a [{n_labels}] bias")
    weight, bias = weight.float(), bias.float()
    _check_finite("classifier", weight, bias)
    return weight.contiguous(), bias.contiguous()


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise AdapterError(f"{name}: weights are not finite")
