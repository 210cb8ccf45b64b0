"""Named entities from a tagger's per-token scores: the post-processing of Hugging Face transformers'
``TokenClassificationPipeline`` (``gather_pre_entities``, ``aggregate``, ``aggregate_words``, ``group_entities``
and the ``ignore_labels`` filter of ``postprocess``), for every ``aggregation_strategy``.

It is written out here rather than called because the fronts that group entities load neither torch nor
transformers (the engine scores the tokens; the pipeline itself needs a torch model to run), so only the standard
library and numpy are imported. ``tests/unit/test_entity_aggregation.py`` holds it equal to the real pipeline.

What it keeps of HF, for the scores of one encoded row (no overflow/stride chunks):

* special tokens (``special_tokens_mask``: [CLS], [SEP], padding) are dropped; ``index`` is the token's position
  in the row, special tokens counted (the first word piece after [CLS] is index 1);
* a token is a *subword* (it continues the previous token's word, for ``first``/``average``/``max``) by HF's rule
  for fast tokenizers: when the tokenizer's model has a ``continuing_subword_prefix`` (WordPiece's ``##``) the token
  string and the text it covers differ in length (``len("##ert") != len("ert")``); otherwise (BPE, Unigram) the
  fallback heuristic, ``start > 0`` and no ``" "`` in ``text[start - 1:start + 1]``. The unknown token is never a
  subword. The length rule is HF's, quirks included: a word whose text holds a character the normalizer drops
  (``"a\\u200bb"`` -> ``ab`` covering 3 characters) counts as a subword of the word before it;
* ``simple`` groups tokens, the word strategies group words: an item joins the group when its tag (the label less
  ``B-``/``I-``; a label without either prefix is an ``I-`` of itself) equals the previous item's and it is not a
  ``B-``; "O" items form groups like any label (so an "O" splits ``B-PER O I-PER`` into two entities) and are
  dropped afterwards. A group is named by its first item's label after the first ``-`` (``label.split("-", 1)[-1]``,
  also for labels without a B-/I- prefix), scores are the ``nanmean`` of its items' scores, ``start`` is its first
  item's and ``end`` its last item's;
* ``first`` takes a word's label and score from its first token's argmax, ``max`` from the token whose best score is
  highest (the earliest on ties), ``average`` from the argmax of the tokens' ``nanmean`` score vector;
* ``ignore_labels`` (default ``["O"]``; giving it replaces the default, as in HF) drops an item whose ``entity``
  (``none``: the full label, e.g. ``B-PER``) or ``entity_group`` (the tag, e.g. ``PER``) is listed.

One difference, by design: ``word`` is always ``text[start:end]`` (HF decodes the tokens, which for an uncased
tokenizer lowercases them and strips accents).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

STRATEGIES: tuple[str, ...] = ("none", "simple", "first", "average", "max")

DEFAULT_IGNORE_LABELS: tuple[str, ...] = ("O",)


@dataclass(frozen=True, slots=True)
class _Token:
    """A non-special token of the row (HF's "pre-entity")."""

    index: int
    start: int
    end: int
    scores: npt.NDArray[Any]  # [L], this token's probabilities
    is_subword: bool


@dataclass(frozen=True, slots=True)
class _Tagged:
    """A token (``simple``) or a word (``first``/``average``/``max``) with its label, before grouping."""

    label: str
    score: Any  # a numpy float scalar, kept as numpy computes it until the output
    start: int
    end: int


def aggregate(
    text: str,
    *,
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    special: Sequence[bool],
    scores: npt.NDArray[Any],
    labels: Sequence[str],
    strategy: str,
    unk_id: int | None = None,
    tokens: Sequence[str] | None = None,
    ignore_labels: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The entities of ``text`` as ``TokenClassificationPipeline(aggregation_strategy=strategy)`` returns them.

    ``scores``: ``[T, L]`` softmax probabilities for every token of the encoded row (``T = len(input_ids)``, special
    tokens included); ``labels[j]`` names column ``j`` (IOB2 tags such as ``"O"``, ``"B-PER"``, ``"I-PER"``, or
    plain labels). ``offsets``: the fast tokenizer's offset mapping into ``text``; ``special``: True for [CLS],
    [SEP] and padding (``special_tokens_mask``). ``unk_id``: the unknown token's id (never a subword).

    ``tokens``: the row's token strings (``Encoding.tokens``). Give them when the tokenizer's model has a
    ``continuing_subword_prefix`` (WordPiece): subwords are then found by HF's length comparison. Leave ``None`` for
    other tokenizers (BPE, Unigram), for which HF uses its fallback heuristic. Only ``first``, ``average`` and
    ``max`` look at subwords.

    ``ignore_labels``: ``None`` is HF's default, ``["O"]``.

    Returns, for ``"none"``, one ``{"entity", "score", "index", "word", "start", "end"}`` per kept token, and for the
    other strategies one ``{"entity_group", "score", "word", "start", "end"}`` per kept group, in text order;
    ``word`` is ``text[start:end]`` and ``score`` a Python float.
    """
    mode = strategy.lower()  # HF accepts any case: AggregationStrategy[strategy.upper()]
    if mode not in STRATEGIES:
        raise ValueError(f"unknown aggregation strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    count = len(input_ids)
    if scores.ndim != 2 or scores.shape[0] != count or scores.shape[1] != len(labels):
        raise ValueError(f"scores of shape {scores.shape} for {count} tokens and {len(labels)} labels")
    if len(offsets) != count or len(special) != count or (tokens is not None and len(tokens) != count):
        raise ValueError("input_ids, offsets, special (and tokens) must have one entry per token")
    ignore = DEFAULT_IGNORE_LABELS if ignore_labels is None else tuple(ignore_labels)

    row = _gather(text, input_ids, offsets, special, scores, unk_id, tokens)
    if mode == "none":
        out: list[dict[str, Any]] = []
        for token in row:
            best = int(np.argmax(token.scores))
            label = labels[best]
            if label in ignore:
                continue
            start, end = token.start, token.end
            out.append({"entity": label, "score": float(token.scores[best]), "index": token.index,
                        "word": text[start:end], "start": start, "end": end})
        return out
    if mode == "simple":
        tagged = [_tag(token.scores, labels, token.start, token.end) for token in row]
    else:
        tagged = [_word(group, labels, mode) for group in _words(row)]
    groups = []
    for items in _group(tagged):
        name = items[0].label.split("-", 1)[-1]
        if name in ignore:
            continue
        start, end = items[0].start, items[-1].end
        score = np.nanmean(np.asarray([item.score for item in items]))
        groups.append({"entity_group": name, "score": float(score), "word": text[start:end], "start": start,
                       "end": end})
    return groups


def _gather(text: str, input_ids: Sequence[int], offsets: Sequence[tuple[int, int]], special: Sequence[bool],
            scores: npt.NDArray[Any], unk_id: int | None, tokens: Sequence[str] | None) -> list[_Token]:
    """The row's non-special tokens, each marked subword or not (HF's ``gather_pre_entities``)."""
    row = []
    for index in range(len(input_ids)):
        if special[index]:
            continue
        start, end = int(offsets[index][0]), int(offsets[index][1])
        if unk_id is not None and int(input_ids[index]) == unk_id:
            is_subword = False
        elif tokens is not None:  # a word-aware (continuing_subword_prefix) tokenizer: compare lengths
            is_subword = len(tokens[index]) != len(text[start:end])
        else:  # HF's fallback: glued to the character before it (only a plain space separates)
            is_subword = start > 0 and " " not in text[start - 1:start + 1]
        row.append(_Token(index=index, start=start, end=end, scores=scores[index], is_subword=is_subword))
    return row


def _tag(scores: npt.NDArray[Any], labels: Sequence[str], start: int, end: int) -> _Tagged:
    best = int(np.argmax(scores))
    return _Tagged(label=labels[best], score=scores[best], start=start, end=end)


def _words(row: list[_Token]) -> list[list[_Token]]:
    """Tokens by word: a word starts at every non-subword token, and at the row's first token whatever it is."""
    words: list[list[_Token]] = []
    for token in row:
        if words and token.is_subword:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _word(tokens: list[_Token], labels: Sequence[str], mode: str) -> _Tagged:
    """One label for a word's tokens (HF's ``aggregate_word``)."""
    start, end = tokens[0].start, tokens[-1].end
    if mode == "first":
        return _tag(tokens[0].scores, labels, start, end)
    if mode == "max":
        chosen = tokens[0]
        for token in tokens[1:]:
            if token.scores.max() > chosen.scores.max():  # strict: the earliest token wins a tie
                chosen = token
        return _tag(chosen.scores, labels, start, end)
    if mode == "average":
        return _tag(np.nanmean(np.stack([token.scores for token in tokens]), axis=0), labels, start, end)
    raise ValueError(f"{mode!r} is not a word strategy")


def _split(label: str) -> tuple[str, str]:
    """``(B|I, tag)``: a label without a B-/I- prefix is a continuation (``I``) of itself."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _group(items: list[_Tagged]) -> list[list[_Tagged]]:
    """Adjacent items of one tag; a ``B-`` always opens a new group (HF's ``group_entities``)."""
    groups: list[list[_Tagged]] = []
    for item in items:
        if groups:
            bi, tag = _split(item.label)
            if bi != "B" and tag == _split(groups[-1][-1].label)[1]:
                groups[-1].append(item)
                continue
        groups.append([item])
    return groups
