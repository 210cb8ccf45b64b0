"""BERT backends: tokenize (with billable token counts), classify, tag tokens and embed.

A backend is one loaded model on one device. It knows nothing of HTTP, tenants or batching policy:
``tokenize`` runs on the request path, ``forward`` runs one padded batch and is what a
:class:`~modelmeter.models.batching.Batcher` calls from its worker thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeAlias

import torch
from tokenizers import Tokenizer
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from modelmeter.models.outputs import Result, TokenScores
from modelmeter.models.text import Encoded, TextEncoder

Task: TypeAlias = Literal["text-classification", "token-classification", "feature-extraction"]

TASKS: tuple[Task, ...] = ("text-classification", "token-classification", "feature-extraction")
__all__ = ["TASKS", "BertBackend", "Result", "Task", "configure_torch_threads", "mean_pooled", "resolve_device"]
_CUDA_SPEC = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a device; ``auto`` prefers CUDA when present."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = _CUDA_SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"unknown device {spec!r}: expected auto, cpu, cuda or cuda:N")
    index = match.group(1)
    return torch.device("cuda", int(index)) if index is not None else torch.device("cuda")


def configure_torch_threads(n: int) -> int:
    """Set torch's intra-op CPU threads (``0``: one per core) and return the number set."""
    if n < 0:
        raise ValueError(f"thread count must be >= 0, got {n}")
    threads = n or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


class BertBackend:
    """A BERT-class model loaded for text classification or feature extraction."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        pad_id: int,
        model: PreTrainedModel,
        task: Task,
        device: torch.device,
        max_length: int,
    ) -> None:
        self._text = TextEncoder(tokenizer, max_length=max_length, dimensions=int(model.config.hidden_size))
        self._pad_id = pad_id
        self._model = model
        self._task: Task = task
        self._device = device
        self._max_length = max_length
        self._labels = _labels_of(model) if task != "feature-extraction" else None

    @classmethod
    def load(cls, path: Path, *, task: Task, device: torch.device, max_length: int = 512) -> BertBackend:
        """Load tokenizer and model from a local directory (never from a hub) onto ``device``."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {TASKS}")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not tokenizer.is_fast:
            raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is required")
        model = _load_model(path, task=task, device=device)
        limit = min(max_length, int(getattr(model.config, "max_position_embeddings", max_length)))
        pad_id = int(tokenizer.pad_token_id or 0)
        return cls(
            tokenizer=tokenizer.backend_tokenizer,
            pad_id=pad_id,
            model=model,
            task=task,
            device=device,
            max_length=limit,
        )

    @property
    def task(self) -> Task:
        return self._task

    @property
    def labels(self) -> list[str] | None:
        """Class labels in logit order for classification; ``None`` for feature extraction."""
        return list(self._labels) if self._labels is not None else None

    @property
    def max_length(self) -> int:
        """The most tokens (special tokens included) one input may have."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dimensions(self) -> int:
        """Length of the vectors feature extraction returns (the encoder's hidden size)."""
        return int(self._model.config.hidden_size)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the model's parameters and buffers."""
        tensors = [*self._model.parameters(), *self._model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def tokenize(self, texts: list[str], *, truncate: bool, spans: bool = False) -> Encoded:
        """Token ids and billable counts for ``texts``; raise :class:`InputTooLong` unless ``truncate``."""
        return self._text.tokenize(texts, truncate=truncate, spans=spans)

    def forward(self, batch_ids: list[list[int]], tags: Sequence[object] | None = None) -> list[Result]:
        """Run one padded batch; one result per input, independent of the rest of the batch.

        ``tags`` (one per row, from the batcher) mean nothing to a single model; see ``AdapterBackend``.
        """
        if not batch_ids:
            return []
        input_ids, mask = self._pad(batch_ids)
        with torch.inference_mode():
            if self._task == "feature-extraction":
                return self._embed(input_ids, mask)
            if self._task == "token-classification":
                return self._tag(input_ids, mask, [len(row) for row in batch_ids])
            return self._classify(input_ids, mask)

    def _pad(self, batch_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in batch_ids)
        padded = [row + [self._pad_id] * (width - len(row)) for row in batch_ids]
        masks = [[1] * len(row) + [0] * (width - len(row)) for row in batch_ids]
        input_ids = torch.tensor(padded, dtype=torch.long, device=self._device)
        return input_ids, torch.tensor(masks, dtype=torch.long, device=self._device)

    def _embed(self, input_ids: torch.Tensor, mask: torch.Tensor) -> list[Result]:
        hidden = self._model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return mean_pooled(hidden, mask)

    def _tag(self, input_ids: torch.Tensor, mask: torch.Tensor, lengths: list[int]) -> list[Result]:
        logits = self._model(input_ids=input_ids, attention_mask=mask).logits
        return token_scores(logits, lengths, tuple(self._labels or ()))

    def _classify(self, input_ids: torch.Tensor, mask: torch.Tensor) -> list[Result]:
        logits = self._model(input_ids=input_ids, attention_mask=mask).logits
        probs: list[list[float]] = logits.to(torch.float32).softmax(dim=-1).cpu().tolist()
        labels = self._labels or []
        return [dict(zip(labels, row, strict=True)) for row in probs]


def token_scores(logits: torch.Tensor, lengths: list[int], labels: tuple[str, ...]) -> list[Result]:
    """Per-token softmax over ``[rows, width, labels]`` logits, each row cut to its own length."""
    probs = logits.to(torch.float32).softmax(dim=-1).cpu().numpy()
    return [TokenScores(labels, probs[i, :n]) for i, n in enumerate(lengths)]


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> list[Result]:
    """Sentence vectors as sentence-transformers makes them: the mean of the real tokens, L2-normalised."""
    # Pool in float32 even when the model runs in float16: sums over 512 tokens lose precision.
    weights = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    mean = summed / weights.sum(dim=1).clamp(min=1e-9)
    vectors = torch.nn.functional.normalize(mean, p=2, dim=1)
    return list(vectors.cpu().tolist())


def _load_model(path: Path, *, task: Task, device: torch.device) -> PreTrainedModel:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    auto = {"text-classification": AutoModelForSequenceClassification,
            "token-classification": AutoModelForTokenClassification}.get(task, AutoModel)
    model: PreTrainedModel = auto.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    module: torch.nn.Module = model  # PreTrainedModel.to's wrapped signature confuses mypy
    module.to(device)
    module.eval()
    return model


def _labels_of(model: PreTrainedModel) -> list[str]:
    id2label: dict[int, str] = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    return [id2label[i] for i in range(len(id2label))]
