"""The fine-tuning loop on a tiny randomly initialised BERT (hidden 32, 2 layers) with the packaged tokenizer."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForSequenceClassification

from modelmeter.models.finetune.batches import length_bucketed_batches
from modelmeter.models.finetune.dataset import Example
from modelmeter.models.finetune.metrics import classification_metrics
from modelmeter.models.finetune.recipes import FullTraining, LoraTraining, training_from_stored
from modelmeter.models.finetune.train import (
    Cancelled,
    Hyperparameters,
    Progress,
    TrainResult,
    train_classifier,
)
from tests.tiny_bert import make_tiny_bert

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LABELS = ["neg", "pos"]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT encoder saved like the packaged base model, with its tokenizer beside it."""
    with torch.random.fork_rng(devices=[]):
        return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), "feature-extraction")


def make_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    words = {"pos": ["great", "lovely", "superb"], "neg": ["awful", "dull", "boring"]}
    examples = []
    for i in range(n):
        label = LABELS[i % 2]
        filler = " ".join(rng.choice(["the", "film", "plot", "was", "really"]) for _ in range(rng.randint(1, 20)))
        examples.append(Example(f"{filler} {rng.choice(words[label])}", label))
    return examples


TRAIN = make_examples(40, seed=1)
VALIDATION = make_examples(11, seed=2)


def run(base: Path, output_dir: Path, **overrides: Any) -> TrainResult:
    options: dict[str, Any] = {
        "base_model_dir": base,
        "train": TRAIN,
        "validation": VALIDATION,
        "labels": LABELS,
        "hparams": Hyperparameters(n_epochs=1, batch_size=8, learning_rate_multiplier=10.0),
        "seed": 7,
        "device": "cpu",
        "output_dir": output_dir,
        "max_length": MAX_LENGTH,
        "training": FullTraining(),
    }
    return train_classifier(**(options | overrides))


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return run(tiny_base, tmp_path_factory.mktemp("runs") / "model")


def test_artifacts_are_safetensors_with_labels_in_the_config(trained: TrainResult) -> None:
    out = trained.output_dir
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["label2id"] == {"neg": 0, "pos": 1}
    assert [p.name for p in out.parent.iterdir()] == ["model"]
    reloaded = BertForSequenceClassification.from_pretrained(out, local_files_only=True)
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}
    assert AutoTokenizer.from_pretrained(out, local_files_only=True)("great")["input_ids"] == [101, 2307, 102]


def test_metrics_have_the_expected_keys_and_supports(trained: TrainResult) -> None:
    metrics = trained.metrics
    assert set(metrics) == {"accuracy", "macro_f1", "per_label", "n_validation"}
    assert metrics["n_validation"] == len(VALIDATION)
    assert {label: m["support"] for label, m in metrics["per_label"].items()} == {"neg": 6, "pos": 5}
    for scores in metrics["per_label"].values():
        assert set(scores) == {"precision", "recall", "f1", "support"}
        assert all(0.0 <= scores[key] <= 1.0 for key in ("precision", "recall", "f1"))
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert trained.examples_per_s > 0
    assert trained.wall_s > 0


def token_count(base: Path, examples: list[Example]) -> int:
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    return sum(len(tokenizer(ex.text, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for ex in examples)


def test_training_tokens_are_the_tokenizer_count_times_epochs(tiny_base: Path, trained: TrainResult) -> None:
    expected = token_count(tiny_base, TRAIN)
    assert any(len(ex.text.split()) + 2 > MAX_LENGTH for ex in TRAIN), "some rows must be truncated"
    assert trained.training_tokens == expected


def saved_weights(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_file(result.output_dir / "model.safetensors")


def test_same_seed_same_model_and_the_caller_rng_is_untouched(tiny_base: Path, tmp_path: Path) -> None:
    hparams = Hyperparameters(n_epochs=2, batch_size=8, learning_rate_multiplier=10.0)
    rng_state = torch.get_rng_state()
    first = run(tiny_base, tmp_path / "a", hparams=hparams)
    assert torch.equal(torch.get_rng_state(), rng_state)
    second = run(tiny_base, tmp_path / "b", hparams=hparams)
    other_seed = run(tiny_base, tmp_path / "c", hparams=hparams, seed=8)
    weights, again = saved_weights(first), saved_weights(second)
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[name], again[name]) for name in weights)
    assert first.metrics == second.metrics
    assert not torch.equal(weights["classifier.weight"], saved_weights(other_seed)["classifier.weight"])
    assert first.training_tokens == 2 * token_count(tiny_base, TRAIN)


def test_progress_is_reported_up_to_the_last_step(tiny_base: Path, tmp_path: Path) -> None:
    reports: list[Progress] = []
    hparams = Hyperparameters(n_epochs=2, batch_size=16, learning_rate_multiplier=1.0)
    run(tiny_base, tmp_path / "m", hparams=hparams, on_progress=reports.append, progress_every=2)
    assert [(p.epoch, p.step) for p in reports] == [(1, 2), (2, 4), (2, 6)]
    assert all(p.total_steps == 6 and p.n_epochs == 2 for p in reports)
    assert reports[-1].eta_s == 0.0
    assert all(p.loss > 0 and p.examples_per_s > 0 for p in reports)


def stop_after(calls: int) -> Callable[[], bool]:
    count = 0

    def should_stop() -> bool:
        nonlocal count
        count += 1
        return count > calls

    return should_stop


@pytest.mark.parametrize("calls", [0, 3])
def test_cancel_raises_and_leaves_no_output(tiny_base: Path, tmp_path: Path, calls: int) -> None:
    with pytest.raises(Cancelled):
        run(tiny_base, tmp_path / "m", should_stop=stop_after(calls))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_leaves_nothing_behind(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(self: Any, directory: Path, **kwargs: Any) -> None:
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(BertForSequenceClassification, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run(tiny_base, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_threads_apply_to_the_call_only(tiny_base: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    run(tiny_base, tmp_path / "m", threads=1, on_progress=lambda _: seen.append(torch.get_num_threads()))
    assert seen
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


def test_refuses_an_existing_output_dir_and_unknown_labels(tiny_base: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError):
        run(tiny_base, tmp_path / "m")
    with pytest.raises(ValueError, match="not in `labels`"):
        run(tiny_base, tmp_path / "n", validation=[Example("x", "meh")])
    with pytest.raises(ValueError, match="non-empty"):
        run(tiny_base, tmp_path / "n", validation=[])


@pytest.mark.parametrize("bad", [{"n_epochs": 0}, {"batch_size": 0}, {"learning_rate_multiplier": 0.0}])
def test_hyperparameters_must_be_positive(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="positive"):
        Hyperparameters(**bad)


def test_classification_metrics_by_hand() -> None:
    metrics = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["per_label"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    b = metrics["per_label"]["b"]
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert metrics["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert metrics["n_validation"] == 5


def test_length_bucketed_batches_cover_every_row_once() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(1000)]
    batches = length_bucketed_batches(lengths, 16, random.Random(5))
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert len(batches) == 63
    assert sorted(map(len, batches))[1:] == [16] * 62
    assert batches == length_bucketed_batches(lengths, 16, random.Random(5))
    assert all(lengths[b[0]] <= lengths[b[-1]] for b in batches)


# --- LoRA ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return run(tiny_base, tmp_path_factory.mktemp("lora") / "adapter", training=LoraTraining(rank=4, alpha=8),
               base_model="tiny-base")


def test_lora_saves_only_the_adapter_and_head_as_safetensors(tiny_base: Path, lora: TrainResult) -> None:
    out = lora.output_dir
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_meta.json",
                                                     "adapter_model.safetensors"]
    meta = json.loads((out / "adapter_meta.json").read_text())
    assert meta == {"format": 1, "task": "text-classification", "base_model": "tiny-base", "labels": LABELS,
                    "rank": 4, "alpha": 8, "target_modules": ["query", "key", "value", "dense"]}
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, "tiny-base")
    weights = load_file(out / "adapter_model.safetensors")
    assert all("lora_" in name or name.startswith("base_model.model.classifier.") for name in weights)
    # Every linear of both encoder layers (q, k, v, attention output, intermediate, output) and the pooler.
    assert sum("lora_A" in name for name in weights) == 2 * 6 + 1
    assert weights["base_model.model.classifier.weight"].shape == (2, 32)
    base_bytes = (tiny_base / "model.safetensors").stat().st_size
    assert (out / "adapter_model.safetensors").stat().st_size < base_bytes / 20


def test_lora_trains_the_factors_and_the_head_only(tiny_base: Path, lora: TrainResult) -> None:
    weights = load_file(lora.output_dir / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: non-zero means it was trained
    assert lora.metrics["n_validation"] == len(VALIDATION)
    assert lora.training_tokens == token_count(tiny_base, TRAIN)


def test_lora_is_deterministic_under_its_seed(tiny_base: Path, lora: TrainResult, tmp_path: Path) -> None:
    again = run(tiny_base, tmp_path / "again", training=LoraTraining(rank=4, alpha=8), base_model="tiny-base")
    first = load_file(lora.output_dir / "adapter_model.safetensors")
    second = load_file(again.output_dir / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_lora_learning_rate_is_its_own_base_times_the_multiplier() -> None:
    hparams = Hyperparameters(learning_rate_multiplier=2.0)
    assert hparams.learning_rate(LoraTraining()) == pytest.approx(2 * LoraTraining().base_learning_rate)
    assert hparams.learning_rate(FullTraining()) == pytest.approx(2e-4)


@pytest.mark.parametrize("rank", [0, 65])
def test_lora_rank_is_bounded(rank: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        LoraTraining(rank=rank)


def test_stored_training_types() -> None:
    assert training_from_stored(None) == FullTraining()  # jobs from before adapters were full fine-tunes
    assert training_from_stored({"type": "full"}) == FullTraining()
    assert training_from_stored({"type": "lora", "rank": 16, "alpha": 32}) == LoraTraining(rank=16, alpha=32)
    with pytest.raises(ValueError, match="unknown"):
        training_from_stored({"type": "prefix"})


def test_shared_dropout_drops_about_p_keeps_the_mean_and_shares_its_mask() -> None:
    from modelmeter.models.finetune.recipes import SharedDropout

    dropout = SharedDropout(0.1)
    dropout.train()
    x = torch.ones(400, 1000)
    y = dropout(x)
    assert (y == 0).float().mean().item() == pytest.approx(26 / 256, abs=0.005)  # p in steps of 1/256
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted dropout: the expectation is kept
    assert dropout(x) is y  # query, key and value get the same input tensor, hence the same mask
    other = dropout(x.clone())
    assert other is not y
    assert not torch.equal(other, y)
    dropout.eval()
    assert dropout(x) is x


def test_lora_branches_of_one_layer_share_their_dropout(tiny_base: Path) -> None:
    from peft.tuners.lora import LoraLayer

    from modelmeter.models.finetune import recipes

    model = BertForSequenceClassification.from_pretrained(tiny_base, num_labels=2, local_files_only=True)
    module = recipes.prepare(model, LoraTraining())
    dropouts = {name: m.lora_dropout["default"] for name, m in module.named_modules() if isinstance(m, LoraLayer)}
    attention = "base_model.model.bert.encoder.layer.0.attention.self."
    assert dropouts[attention + "query"] is dropouts[attention + "key"] is dropouts[attention + "value"]
    assert dropouts[attention + "query"] is not dropouts["base_model.model.bert.encoder.layer.0.output.dense"]
    assert all(isinstance(d, recipes.SharedDropout) for d in dropouts.values())
