"""Fine-tune a BERT encoder into a named-entity tagger: alignment, the training loop, evaluation and saving.

``BertForTokenClassification`` on the base, trained by the classifier's loop (``loop.Trainer``, a label per
token) with the same schedule, clipping and training types (a LoRA adapter and head through PEFT, or every
weight). Words are encoded as words (``is_split_into_words``): a word's first sub-token carries its IOB2 tag, its
other sub-tokens the tag's continuation, special tokens are out of the loss (``align`` says why). Evaluation predicts
each word's tag from its first sub-token (a word cut off by truncation predicts ``O``) and scores entities with
seqeval (``metrics.entity_metrics``): exact span and type, per type and micro averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Unpack

import torch
from transformers import BertForTokenClassification

from modelmeter.models.finetune.loop import _never
from modelmeter.models.finetune.metrics import entity_metrics
from modelmeter.models.finetune.tagged import TaggedExample
from modelmeter.models.finetune.train import (
    EVAL_BATCH_SIZE,
    IGNORE,
    Cancelled,
    Task,
    TrainOptions,
    TrainResult,
    _pad_id,
    best_classes,
    run_training,
)

TASK = "token-classification"
__all__ = ["Cancelled", "align", "predict", "train_tagger"]


def align(tokenizer: Any, examples: list[TaggedExample], tags: list[str], max_length: int
          ) -> tuple[list[list[int]], list[list[int]], list[list[int | None]]]:
    """Token ids, the label of each token and each token's word index (None for special tokens), per example.

    A word's first sub-token carries its tag; its other sub-tokens carry the tag's continuation (``B-X`` ->
    ``I-X``, ``I-X`` and ``O`` unchanged); special tokens -100 (out of the loss). Labelling only the first
    sub-token (the other common recipe) leaves the continuations untrained, and the served default
    (``simple``) reads every sub-token: a tagger trained that way on the shipped sample answered "Northwind Bank"
    as two ORG entities, "North" and "wind Bank". Evaluation reads first sub-tokens either way."""
    index = {tag: i for i, tag in enumerate(tags)}
    ids, words = _encode_words(tokenizer, examples, max_length)
    labels = []
    for example, word_ids in zip(examples, words, strict=True):
        previous: int | None = None
        row_labels = []
        for word in word_ids:
            if word is None:
                row_labels.append(IGNORE)
            else:
                tag = example.tags[word]
                row_labels.append(index["I-" + tag[2:] if word == previous and tag.startswith("B-") else tag])
            previous = word
        labels.append(row_labels)
    return ids, labels, words


def _encode_words(tokenizer: Any, examples: list[TaggedExample], max_length: int
                  ) -> tuple[list[list[int]], list[list[int | None]]]:
    """Each example's token ids and the word of each token (None: a special token), truncated to ``max_length``."""
    if not examples:
        return [], []
    encoded = tokenizer([list(ex.words) for ex in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length)
    return encoded["input_ids"], [encoded.word_ids(row) for row in range(len(examples))]


def train_tagger(*, train: list[TaggedExample], validation: list[TaggedExample], tags: list[str],
                 **options: Unpack[TrainOptions]) -> TrainResult:
    """Fine-tune a tagger on ``train`` (label ``tags[i]`` is class ``i``, ``O`` first) and save it; the contract
    of ``train.train_classifier`` (``TrainOptions``: atomic save, :class:`Cancelled`, deterministic under
    ``seed``, billable tokens = tokens per epoch x epochs). Its metrics are ``metrics.entity_metrics`` on
    ``validation``."""
    _check(train, validation, tags, options["output_dir"])
    base_dir = options["base_model_dir"]

    def encode(tokenizer: Any, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
        ids, labels, _ = align(tokenizer, train, tags, max_length)
        return ids, labels

    def evaluate(model: torch.nn.Module, tokenizer: Any, dev: torch.device, max_length: int,
                 stop: Callable[[], bool]) -> Any:
        predicted = predict(model, tokenizer, validation, tags, dev, max_length, stop=stop)
        return entity_metrics([list(ex.tags) for ex in validation], predicted)

    return run_training(options, Task(name=TASK, labels=tags, n_examples=len(train), encode=encode,
                                      load=lambda dev: _load_model(base_dir, tags, dev), evaluate=evaluate,
                                      per_token=True))


def predict(model: torch.nn.Module, tokenizer: Any, examples: list[TaggedExample], tags: list[str],
            device: torch.device, max_length: int, *, batch_size: int = EVAL_BATCH_SIZE,
            stop: Callable[[], bool] = _never) -> list[list[str]]:
    """Each word's tag, read from its first sub-token; words past the truncation are ``O``."""
    ids, words = _encode_words(tokenizer, examples, max_length)
    predicted: list[list[str]] = [["O"] * len(ex.words) for ex in examples]
    for batch, best in best_classes(model, ids, _pad_id(tokenizer), device, batch_size=batch_size, stop=stop):
        for row, i in enumerate(batch):
            previous: int | None = None
            for position, word in enumerate(words[i]):
                if word is not None and word != previous:
                    predicted[i][word] = tags[int(best[row, position])]
                previous = word
    return predicted


def _check(train: list[TaggedExample], validation: list[TaggedExample], tags: list[str], output_dir: Path) -> None:
    if not train or not validation:
        raise ValueError("training and validation sets must both be non-empty")
    if len(tags) < 2 or tags[0] != "O" or len(set(tags)) != len(tags):
        raise ValueError(f"tags must start with O and be distinct, got {tags}")
    unknown = {tag for ex in (*train, *validation) for tag in ex.tags} - set(tags)
    if unknown:
        raise ValueError(f"examples have tags not in `tags`: {sorted(unknown)}")
    if output_dir.exists():
        raise FileExistsError(f"output directory already exists: {output_dir}")


def _load_model(base_model_dir: Path, tags: list[str], device: torch.device) -> BertForTokenClassification:
    model = BertForTokenClassification.from_pretrained(
        base_model_dir, num_labels=len(tags), id2label=dict(enumerate(tags)),
        label2id={tag: i for i, tag in enumerate(tags)}, ignore_mismatched_sizes=True, local_files_only=True)
    torch.nn.Module.to(model, device=device, dtype=torch.float32)
    return model
