"""Fine-tune a BERT encoder into a named-entity tagger: alignment, the training loop, evaluation and saving.

``BertForTokenClassification`` on the base, trained by the classifier's loop (``train._Trainer``, a label per
token) with the same schedule, clipping and training types (a LoRA adapter and head through PEFT, or every
weight). Words are encoded as words (``is_split_into_words``): a word's first sub-token carries its IOB2 tag, its
other sub-tokens the tag's continuation, special tokens are out of the loss (``align`` says why). Evaluation predicts
each word's tag from its first sub-token (a word cut off by truncation predicts ``O``) and scores entities with
seqeval (``metrics.entity_metrics``): exact span and type, per type and micro averaged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BertForTokenClassification

from modelmeter.models.finetune import recipes
from modelmeter.models.finetune.metrics import entity_metrics
from modelmeter.models.finetune.recipes import LoraTraining, TrainingType
from modelmeter.models.finetune.tagged import TaggedExample
from modelmeter.models.finetune.train import (
    EVAL_BATCH_SIZE,
    IGNORE,
    Cancelled,
    Hyperparameters,
    Progress,
    TrainResult,
    _autocast,
    _collate,
    _cuda_devices,
    _never,
    _pad_id,
    _raise_if_stopped,
    _save_atomically,
    _torch_threads,
    _Trainer,
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


def train_tagger(
    *,
    base_model_dir: Path,
    train: list[TaggedExample],
    validation: list[TaggedExample],
    tags: list[str],
    hparams: Hyperparameters,
    seed: int,
    device: torch.device | str,
    output_dir: Path,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_length: int = 128,
    progress_every: int = 20,
    threads: int | None = None,
    show_progress: bool = False,
    training: TrainingType = LoraTraining(),
    base_model: str = "base",
) -> TrainResult:
    """Fine-tune a tagger on ``train`` (label ``tags[i]`` is class ``i``, ``O`` first) and save it; the contract
    of ``train.train_classifier`` (atomic save, :class:`Cancelled`, deterministic under ``seed``, billable tokens =
    tokens per epoch x epochs). Its metrics are ``metrics.entity_metrics`` on ``validation``."""
    started = time.perf_counter()
    _check(train, validation, tags, output_dir)
    dev = torch.device(device)
    stop = should_stop or _never
    with _torch_threads(threads), torch.random.fork_rng(devices=_cuda_devices(dev), device_type="cuda"):
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(base_model_dir, local_files_only=True)
        ids, labels, _ = align(tokenizer, train, tags, max_length)
        model = recipes.prepare(_load_model(base_model_dir, tags, dev), training, task=TASK)
        trainer = _Trainer(model=model, device=dev, hparams=hparams, seed=seed, pad_id=_pad_id(tokenizer),
                           learning_rate=hparams.learning_rate(training), per_token=True)
        train_s = trainer.fit(ids, labels, stop=stop, on_progress=on_progress, progress_every=progress_every,
                              show_progress=show_progress)
        predicted = predict(model, tokenizer, validation, tags, dev, max_length, stop=stop)
        metrics = entity_metrics([list(ex.tags) for ex in validation], predicted)
        _raise_if_stopped(stop)
        _save_atomically(lambda staging: recipes.save(model, tokenizer, training, labels=tags, base_model=base_model,
                                                      directory=staging, task=TASK), output_dir)
    return TrainResult(metrics=metrics, training_tokens=sum(map(len, ids)) * hparams.n_epochs,
                       examples_per_s=len(train) * hparams.n_epochs / train_s,
                       wall_s=time.perf_counter() - started, output_dir=output_dir)


def predict(model: torch.nn.Module, tokenizer: Any, examples: list[TaggedExample], tags: list[str],
            device: torch.device, max_length: int, *, batch_size: int = EVAL_BATCH_SIZE,
            stop: Callable[[], bool] = _never) -> list[list[str]]:
    """Each word's tag, read from its first sub-token; words past the truncation are ``O``."""
    ids, words = _encode_words(tokenizer, examples, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    predicted: list[list[str]] = [["O"] * len(ex.words) for ex in examples]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device):
            for start in range(0, len(order), batch_size):
                _raise_if_stopped(stop)
                batch = order[start:start + batch_size]
                best = model(**_collate([ids[i] for i in batch], _pad_id(tokenizer), device)).logits.argmax(dim=-1)
                for row, i in enumerate(batch):
                    previous: int | None = None
                    for position, word in enumerate(words[i]):
                        if word is not None and word != previous:
                            predicted[i][word] = tags[int(best[row, position])]
                        previous = word
    finally:
        model.train(was_training)
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
