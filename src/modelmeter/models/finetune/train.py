"""Fine-tune a BERT encoder into a text classifier: one run (``run_training``, shared with the tagger of
``tagging``), evaluation and the atomic save.

The classic recipe: ``BertForSequenceClassification`` on top of the base encoder, trained by ``loop.Trainer``
(AdamW with linear warmup and decay, cross-entropy, gradient clipping); what is trained (a LoRA adapter and
head, or every weight) and how it is saved is the training type's (:mod:`~modelmeter.models.finetune.recipes`).
Training is deterministic under ``seed`` on CPU (on CUDA up to the nondeterminism of its kernels) and leaves the
caller's RNG state untouched.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from modelmeter.models.finetune import recipes
from modelmeter.models.finetune.dataset import Example
from modelmeter.models.finetune.loop import (
    IGNORE,
    Cancelled,
    Hyperparameters,
    Progress,
    Trainer,
    _autocast,
    _collate,
    _never,
    _raise_if_stopped,
)
from modelmeter.models.finetune.metrics import EntityMetrics, Metrics, classification_metrics
from modelmeter.models.finetune.recipes import LoraTraining, TrainingType

# Re-exported: what callers of a training run name (the loop's own types included).
__all__ = ["EVAL_BATCH_SIZE", "IGNORE", "Cancelled", "Hyperparameters", "Progress", "Task", "TrainOptions",
           "TrainResult", "best_classes", "evaluate", "run_training", "train_classifier"]

EVAL_BATCH_SIZE = 64


@dataclass
class TrainResult:
    """What a finished training run produced: validation metrics, billable tokens, speed, artifacts."""

    metrics: Metrics | EntityMetrics  # a classifier's, or a tagger's (tagging.train_tagger)
    training_tokens: int
    examples_per_s: float
    wall_s: float
    output_dir: Path


class TrainOptions(TypedDict, total=False):
    """How a run runs, whatever it trains: ``train_classifier`` and ``tagging.train_tagger`` take these as
    keywords (written once here). The artifact goes to ``output_dir`` (which must not exist) only once training
    and evaluation succeeded, through a temporary sibling directory, so a failure or :class:`Cancelled` leaves
    nothing behind. ``should_stop`` is polled before every step; ``threads`` sets torch's CPU threads for this
    call only; ``base_model`` is the id the artifact records it was trained on."""

    base_model_dir: Required[Path]
    hparams: Required[Hyperparameters]
    seed: Required[int]
    device: Required[torch.device | str]
    output_dir: Required[Path]
    on_progress: Callable[[Progress], None] | None
    should_stop: Callable[[], bool] | None
    max_length: int
    progress_every: int
    threads: int | None
    show_progress: bool
    training: TrainingType
    base_model: str


@dataclass(frozen=True)
class Task:
    """What a classifier and a tagger do differently inside one run (``run_training``)."""

    name: str  # recipes' task: "text-classification" or "token-classification"
    labels: list[str]  # the classes, or the tags ("O" first)
    n_examples: int
    encode: Callable[[Any, int], tuple[list[list[int]], Any]]  # (tokenizer, max_length) -> (token ids, targets)
    load: Callable[[torch.device], torch.nn.Module]  # the base with a new head, on the device
    evaluate: Callable[[torch.nn.Module, Any, torch.device, int, Callable[[], bool]], Any]  # -> metrics
    per_token: bool = False


def run_training(options: TrainOptions, task: Task) -> TrainResult:
    """One seeded run: tokenize, prepare the training type, fit, evaluate, save atomically (``TrainOptions``).
    Billable tokens are the tokens of one epoch times the epochs."""
    unknown = set(options) - set(TrainOptions.__annotations__)
    if unknown:  # keywords are checked statically (Unpack); a typo at run time must not pass silently either
        raise TypeError(f"unknown training options: {sorted(unknown)}")
    started = time.perf_counter()
    dev = torch.device(options["device"])
    stop = options.get("should_stop") or _never
    training = options.get("training", LoraTraining())
    hparams, max_length, seed = options["hparams"], options.get("max_length", 128), options["seed"]
    with _torch_threads(options.get("threads")), torch.random.fork_rng(devices=_cuda_devices(dev), device_type="cuda"):
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(options["base_model_dir"], local_files_only=True)
        ids, targets = task.encode(tokenizer, max_length)
        model = recipes.prepare(task.load(dev), training, task=task.name)
        trainer = Trainer(model=model, device=dev, hparams=hparams, seed=seed, pad_id=_pad_id(tokenizer),
                           learning_rate=hparams.learning_rate(training), per_token=task.per_token)
        train_s = trainer.fit(ids, targets, stop=stop, on_progress=options.get("on_progress"),
                              progress_every=options.get("progress_every", 20),
                              show_progress=options.get("show_progress", False))
        metrics = task.evaluate(model, tokenizer, dev, max_length, stop)
        _raise_if_stopped(stop)
        _save_atomically(lambda staging: recipes.save(model, tokenizer, training, labels=task.labels,
                                                      base_model=options.get("base_model", "base"),
                                                      directory=staging, task=task.name), options["output_dir"])
    return TrainResult(metrics=metrics, training_tokens=sum(map(len, ids)) * hparams.n_epochs,
                       examples_per_s=task.n_examples * hparams.n_epochs / train_s,
                       wall_s=time.perf_counter() - started, output_dir=options["output_dir"])


def train_classifier(*, train: list[Example], validation: list[Example], labels: list[str],
                     **options: Unpack[TrainOptions]) -> TrainResult:
    """Fine-tune the BERT model in ``base_model_dir`` on ``train`` and save what ``training`` trained
    (``TrainOptions``). Label ``labels[i]`` is class ``i``; a full model's config carries ``id2label``/
    ``label2id``, an adapter's ``adapter_meta.json`` the labels (and ``base_model``)."""
    _check_inputs(train=train, validation=validation, labels=labels, output_dir=options["output_dir"])
    base_dir = options["base_model_dir"]
    return run_training(options, Task(
        name="text-classification", labels=labels, n_examples=len(train),
        encode=lambda tokenizer, max_length: (_encode(tokenizer, [ex.text for ex in train], max_length),
                                              _label_ids(train, labels)),
        load=lambda dev: _load_model(base_dir, labels, dev),
        evaluate=lambda model, tokenizer, dev, max_length, stop: evaluate(model, tokenizer, validation, labels, dev,
                                                                          max_length, should_stop=stop),
    ))


def _check_inputs(*, train: list[Example], validation: list[Example], labels: list[str], output_dir: Path) -> None:
    if not train or not validation:
        raise ValueError("training and validation sets must both be non-empty")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be at least 2 distinct strings, got {labels}")
    unknown = {ex.label for ex in (*train, *validation)} - set(labels)
    if unknown:
        raise ValueError(f"examples have labels not in `labels`: {sorted(unknown)}")
    if output_dir.exists():
        raise FileExistsError(f"output directory already exists: {output_dir}")


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _load_model(base_model_dir: Path, labels: list[str], device: torch.device) -> BertForSequenceClassification:
    model = BertForSequenceClassification.from_pretrained(
        base_model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type="single_label_classification",
        # A base that is itself a fine-tuned classifier may have another number of labels: new head.
        ignore_mismatched_sizes=True,
        local_files_only=True,
    )
    # Trained in float32 whatever the checkpoint's dtype; autocast provides the mixed precision.
    torch.nn.Module.to(model, device=device, dtype=torch.float32)
    return model


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    if not texts:
        return []
    ids: list[list[int]] = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return ids


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


def _label_ids(examples: list[Example], labels: list[str]) -> list[int]:
    index = {label: i for i, label in enumerate(labels)}
    return [index[ex.label] for ex in examples]


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    labels: list[str],
    device: torch.device | str,
    max_length: int,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    should_stop: Callable[[], bool] | None = None,
) -> Metrics:
    """Classify ``examples`` and score them: accuracy, macro F1, per-label precision/recall/F1/support.

    Class ``i`` is ``labels[i]``. Undefined ratios (no predictions or no support) count as 0. The model's
    train/eval mode is restored afterwards; :class:`Cancelled` is raised between batches on ``should_stop``.
    """
    gold = _label_ids(examples, labels)
    predicted = _predict(
        model,
        tokenizer,
        [ex.text for ex in examples],
        torch.device(device),
        max_length,
        batch_size=batch_size,
        stop=should_stop or _never,
    )
    return classification_metrics(gold, predicted, labels)


def best_classes(model: torch.nn.Module, ids: list[list[int]], pad_id: int, device: torch.device, *,
                 batch_size: int, stop: Callable[[], bool]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Inference over ``ids`` in batches of similar length (least padding), in eval mode: for each batch, the
    indices of its rows and the argmax over the last dimension of the logits (a class per row, or per token)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device):
            for start in range(0, len(order), batch_size):
                _raise_if_stopped(stop)
                batch = order[start : start + batch_size]
                yield batch, model(**_collate([ids[i] for i in batch], pad_id, device)).logits.argmax(dim=-1)
    finally:
        model.train(was_training)


def _predict(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    device: torch.device,
    max_length: int,
    *,
    batch_size: int,
    stop: Callable[[], bool],
) -> list[int]:
    encoded = _encode(tokenizer, texts, max_length)
    predicted = [0] * len(encoded)
    for batch, best in best_classes(model, encoded, _pad_id(tokenizer), device, batch_size=batch_size, stop=stop):
        for i, label_id in zip(batch, best.tolist(), strict=True):
            predicted[i] = label_id
    return predicted


def _save_atomically(write: Callable[[Path], None], output_dir: Path) -> None:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        write(staging)
        if output_dir.exists():
            raise FileExistsError(f"output directory already exists: {output_dir}")
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
