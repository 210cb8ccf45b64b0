"""Taggers on the shared base: a tagger adapter's rows share batches with classifier adapters and plain embeddings,
and every row equals its model run alone (PEFT's merge of the adapter; the plain base) to 1e-5. The per-token head
is gathered from the same label pages as a classifier's, so this also checks that no row reads another's head."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from modelmeter.models.adapters.backend import AdapterBackend, ResidentAdapter
from modelmeter.models.backends import BertBackend
from modelmeter.models.engine import protocol as p
from modelmeter.models.engine.core import _done
from modelmeter.models.outputs import TokenScores
from tests.tiny_bert import (
    make_tiny_adapter,
    make_tiny_bert,
    make_tiny_tagger_adapter,
    merged_classifier,
    merged_tagger,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TEXTS = ["Anna lives in Oslo", "ok", "José Müller visited Zürich, twice: Zürich!", " ".join(["word"] * 40)]


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("taggers")
    base = make_tiny_bert(root / "base", "feature-extraction")
    tagger = make_tiny_tagger_adapter(root / "tagger", base, TAGS, rank=4, seed=1)
    tagger2 = make_tiny_tagger_adapter(root / "tagger2", base, ["O", "B-ORG", "I-ORG"], rank=8, seed=2)
    classifier = make_tiny_adapter(root / "classifier", base, ["neg", "pos", "mixed"], rank=2, seed=3)
    return {"base": base, "paths": [tagger, tagger2, classifier],
            "merged": [merged_tagger(base, tagger, len(TAGS)), merged_tagger(base, tagger2, 3),
                       merged_classifier(base, classifier, 3)],
            "plain": BertBackend.load(base, task="feature-extraction", device=CPU)}


@pytest.mark.parametrize("device_bytes", [None, 1], ids=["one-tier", "two-tier"])
def test_a_mixed_batch_of_taggers_classifiers_and_embeddings_equals_each_alone(
        parts: dict[str, object], device_bytes: int | None) -> None:
    base, paths, merged, plain = parts["base"], parts["paths"], parts["merged"], parts["plain"]
    assert isinstance(base, Path)
    assert isinstance(paths, list)
    assert isinstance(merged, list)
    assert isinstance(plain, BertBackend)
    backend = AdapterBackend.load_base(base, device=CPU, budget_bytes=64 * 1024 * 1024, device_bytes=device_bytes,
                                       max_batch_size=64, max_labels=8)
    adapters: list[ResidentAdapter] = []
    for i, path in enumerate(paths):
        adapter = backend.read_adapter(f"m{i}", path)
        backend.admit(adapter)
        adapters.append(adapter)
    assert [a.task for a in adapters] == ["token-classification", "token-classification", "text-classification"]
    rows = [(which, text) for which in (None, 0, 1, 2) for text in TEXTS]
    random.Random(0).shuffle(rows)
    ids = [backend.tokenize([text], truncate=False).ids[0] for _, text in rows]
    results = backend.forward(ids, [adapters[w] if w is not None else None for w, _ in rows])
    for (which, _), row_ids, result in zip(rows, ids, results, strict=True):
        if which is None:
            assert result == pytest.approx(plain.forward([row_ids])[0], abs=1e-5)
            continue
        with torch.inference_mode():
            logits = merged[which](input_ids=torch.tensor([row_ids])).logits  # type: ignore[operator]
        if which == 2:
            assert isinstance(result, dict)
            assert list(result.values()) == pytest.approx(logits.softmax(-1)[0].tolist(), abs=1e-5)
            continue
        assert isinstance(result, TokenScores)
        assert result.labels == adapters[which].labels
        assert result.scores.shape == (len(row_ids), len(result.labels))
        assert result.scores == pytest.approx(logits.softmax(-1)[0].numpy(), abs=1e-5)


def test_token_scores_cross_the_engine_protocol_exactly() -> None:
    """A tagger's reply: float32 [tokens of every row, labels], split back by the row lengths the front sent."""
    rows = [TokenScores(("O", "B-X", "I-X"), torch.rand(n, 3).softmax(-1).numpy()) for n in (3, 7, 1)]
    done = _done(5, rows, 0.001, 0.002, 0.003)
    wire = p.to_front_decoder.decode(p.to_engine_encoder.encode(done))
    assert isinstance(wire, p.Done)
    back = p.unpack_token_scores(wire, [3, 7, 1])
    for sent, got in zip(rows, back, strict=True):
        assert got.labels == sent.labels
        assert (got.scores == sent.scores).all()
    with pytest.raises(ValueError, match="shape"):
        p.unpack_token_scores(wire, [3, 7, 2])


def test_a_simulated_device_answers_taggers_with_token_scores_of_the_right_shape() -> None:
    from modelmeter.models.simulated import SimulatedDevice

    tags = ("O", "B-X", "I-X")
    run = SimulatedDevice(0.0, 0.0).forward(labels_of=lambda tag: tags if tag else None, dimensions=4,
                                            task_of=lambda tag: "token-classification" if tag else "feature-extraction")
    tagged, vector = run([[101, 7, 8, 102], [101, 9, 102]], ["tagger", None])
    assert isinstance(tagged, TokenScores)
    assert tagged.scores.shape == (4, 3)
    assert tagged.scores.sum(axis=1) == pytest.approx([1.0] * 4)
    assert isinstance(vector, list)
    assert len(vector) == 4
