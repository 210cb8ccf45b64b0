"""Named-entity training files: parsing and validation (errors name the line and the field).

JSONL, one sentence a line, in one of two forms (one form per file):

- ``{"tokens": ["Anna", "lives", "in", "Oslo"], "tags": ["B-PER", "O", "O", "B-LOC"]}``: IOB2 tags, one per token;
- ``{"text": "Anna lives in Oslo", "entities": [{"start": 0, "end": 4, "label": "PER"}, ...]}``: character spans,
  ``end`` exclusive. The text is split into words as BERT's pre-tokenizer splits it (whitespace, and punctuation
  as words of its own); a word a span overlaps is tagged ``B-`` (the span's first word) or ``I-``, every other
  word ``O``.

An ``I-X`` that has no ``X`` to continue (first, after ``O`` or after another type) begins an entity, as IOB2
reads it: it becomes ``B-X`` and the parse says so in ``notes``. Entity types follow the label rules of
classification files (at most ``MAX_TYPE_CHARS`` characters, no control or format characters); at most
``MAX_TYPES`` types in a file. Extra keys are ignored.
"""

from __future__ import annotations

import bisect
import itertools
import json
import unicodedata
from dataclasses import dataclass
from typing import Any

from tokenizers.pre_tokenizers import BertPreTokenizer

from modelmeter.models.finetune.dataset import DatasetError, _json_type, decode_text, json_object

MAX_TYPES = 100
MAX_TYPE_CHARS = 50
MAX_NOTES = 20
_SPLITTER = BertPreTokenizer()


@dataclass(frozen=True)
class TaggedExample:
    """One sentence: its words and their IOB2 tags."""

    words: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class TaggedDataset:
    """A file's sentences in file order, its entity types (sorted), the model's labels (``O``, then ``B-``/``I-``
    of each type in that order) and what the parse changed (``notes``)."""

    examples: list[TaggedExample]
    types: list[str]
    tags: list[str]
    notes: list[str]


def looks_tagged(data: bytes) -> bool:
    """Whether the first non-blank line is a JSON object with a ``tokens`` or ``entities`` array and no ``label``
    (a named-entity file); a classification row that carries a ``tokens`` count as metadata stays one."""
    for raw in data.split(b"\n", 64)[:64]:
        if raw.strip():
            try:
                obj = json.loads(raw.decode("utf-8", errors="replace").removeprefix("\ufeff"))
            except (ValueError, RecursionError):
                return False
            return (isinstance(obj, dict) and "label" not in obj
                    and (isinstance(obj.get("tokens"), list) or isinstance(obj.get("entities"), list)))
    return False


def parse_tagged(data: bytes, *, max_rows: int, max_text_chars: int) -> TaggedDataset:
    """Parse and validate a named-entity file; raise :class:`DatasetError` on the first problem found."""
    text = decode_text(data)
    examples: list[TaggedExample] = []
    types: set[str] = set()
    notes = _Notes()
    form: tuple[str, int] | None = None  # the file's form and the line that set it
    for index, raw in enumerate(text.split("\n")):
        if not raw.strip():
            continue
        line = index + 1
        obj = json_object(raw, line)
        kind = "tokens" if "tokens" in obj else "text" if "text" in obj or "entities" in obj else None
        if kind is None:
            raise DatasetError("expected 'tokens' and 'tags', or 'text' and 'entities'", line)
        if form is None:
            form = (kind, line)
        elif kind != form[0]:
            raise DatasetError(f"this row has '{kind}' but line {form[1]} has '{form[0]}': one form per file", line)
        if len(examples) >= max_rows:
            raise DatasetError(f"too many rows: at most {max_rows} sentences are allowed", line)
        examples.append(_row(obj, kind, line, max_text_chars, types, notes))
    if not examples:
        raise DatasetError("file has no sentences")
    if not types:
        raise DatasetError("no entities in the file: at least one tag other than O is needed")
    ordered = sorted(types)
    return TaggedDataset(examples, ordered, ["O", *(f"{p}-{t}" for t in ordered for p in "BI")], notes.lines())


class _Notes:
    """The first ``MAX_NOTES`` notes of a parse, and how many more there were."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.more = 0

    def add(self, note: str) -> None:
        if len(self.kept) < MAX_NOTES:
            self.kept.append(note)
        else:
            self.more += 1

    def lines(self) -> list[str]:
        return [*self.kept, f"... and {self.more} more"] if self.more else list(self.kept)


def _row(obj: dict[str, Any], kind: str, line: int, max_text_chars: int, types: set[str],
         notes: _Notes) -> TaggedExample:
    if kind == "tokens":
        words, tags = _tokens_row(obj, line, max_text_chars)
    else:
        words, tags = _spans_row(obj, line, max_text_chars)
    tags = _begin_orphans(tags, line, notes)
    for tag in tags:
        if tag != "O" and tag[2:] not in types:
            types.add(tag[2:])
            if len(types) > MAX_TYPES:
                raise DatasetError(f"too many entity types: at most {MAX_TYPES} are allowed", line)
    return TaggedExample(tuple(words), tuple(tags))


def _strings(obj: dict[str, Any], field: str, line: int) -> list[str]:
    value = obj.get(field)
    if value is None:
        raise DatasetError(f"missing '{field}'", line)
    if not isinstance(value, list):
        raise DatasetError(f"'{field}' must be an array of strings, got {_json_type(value)}", line)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DatasetError(f"'{field}[{i}]' must be a string, got {_json_type(item)}", line)
    return value


def _tokens_row(obj: dict[str, Any], line: int, max_text_chars: int) -> tuple[list[str], list[str]]:
    words = _strings(obj, "tokens", line)
    tags = _strings(obj, "tags", line)
    if not words:
        raise DatasetError("'tokens' is empty", line)
    length = sum(map(len, words)) + len(words) - 1
    if length > max_text_chars:
        raise DatasetError(f"'tokens' joined by spaces are {length} characters long; at most {max_text_chars} are "
                           "allowed", line)
    for i, word in enumerate(words):
        if not word.strip():
            raise DatasetError(f"'tokens[{i}]' is empty or blank", line)
    if len(tags) != len(words):
        raise DatasetError(f"'tags' has {len(tags)} items and 'tokens' {len(words)}: one tag per token", line)
    for i, tag in enumerate(tags):
        if tag != "O" and not tag.startswith(("B-", "I-")):
            raise DatasetError(f"'tags[{i}]' is '{tag[:60]}': expected IOB2 tags (O, B-TYPE, I-TYPE)", line)
        if tag != "O":
            _check_type(tag[2:], f"tags[{i}]", line)
    return words, tags


def _spans_row(obj: dict[str, Any], line: int, max_text_chars: int) -> tuple[list[str], list[str]]:
    text = obj.get("text")
    if not isinstance(text, str):
        raise DatasetError("missing 'text'" if text is None else f"'text' must be a string, got {_json_type(text)}",
                           line)
    if len(text) > max_text_chars:
        raise DatasetError(f"'text' is {len(text)} characters long; at most {max_text_chars} are allowed", line)
    words = _SPLITTER.pre_tokenize_str(text)
    if not words:
        raise DatasetError("'text' is empty or blank", line)
    spans = obj.get("entities")
    if not isinstance(spans, list):
        raise DatasetError("missing 'entities'" if spans is None
                           else f"'entities' must be an array, got {_json_type(spans)}", line)
    checked = [(*_span(span, i, len(text), line), i) for i, span in enumerate(spans)]
    _check_overlaps(checked, line)
    return [word for word, _ in words], _span_tags(words, checked, line)


def _check_overlaps(spans: list[tuple[int, int, str, int]], line: int) -> None:
    # Sorted by start, with no overlap found so far: a span can only overlap the one just before it.
    for before, after in itertools.pairwise(sorted(spans)):
        if after[0] < before[1]:
            first, second = sorted((before, after), key=lambda span: span[3])
            raise DatasetError(f"'entities[{second[3]}]' ({second[0]}-{second[1]}) overlaps 'entities[{first[3]}]' "
                               f"({first[0]}-{first[1]})", line)


def _span_tags(words: list[tuple[str, tuple[int, int]]], spans: list[tuple[int, int, str, int]],
               line: int) -> list[str]:
    # Words are in text order and do not overlap: those a span overlaps are a run found by bisection.
    word_starts = [start for _, (start, _) in words]
    word_ends = [end for _, (_, end) in words]
    tags = ["O"] * len(words)
    for start, end, label, i in spans:
        first_word, stop = bisect.bisect_right(word_ends, start), bisect.bisect_left(word_starts, end)
        if first_word >= stop:
            raise DatasetError(f"'entities[{i}]' ({start}-{end}) covers no word of 'text'", line)
        for k in range(first_word, stop):
            if tags[k] != "O":
                raise DatasetError(f"'entities[{i}]' ({start}-{end}) shares the word {words[k][0][:60]!r} with "
                                   "another entity: spans are tagged by whole words", line)
            tags[k] = f"{'B' if k == first_word else 'I'}-{label}"
    return tags


def _span(span: object, i: int, length: int, line: int) -> tuple[int, int, str]:
    if not isinstance(span, dict):
        raise DatasetError(f"'entities[{i}]' must be an object, got {_json_type(span)}", line)
    values = []
    for field in ("start", "end"):
        value = span.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"'entities[{i}].{field}' must be an integer, got {_json_type(value)}", line)
        values.append(value)
    start, end = values
    if not 0 <= start < end <= length:
        raise DatasetError(f"'entities[{i}]' is {start}-{end}: spans need 0 <= start < end <= {length} (the "
                           "length of 'text')", line)
    label = span.get("label")
    if not isinstance(label, str):
        raise DatasetError(f"'entities[{i}].label' must be a string, got {_json_type(label)}", line)
    _check_type(label, f"entities[{i}].label", line)
    return start, end, label


def _check_type(kind: str, field: str, line: int) -> None:
    if not kind.strip():
        raise DatasetError(f"'{field}' has an empty entity type", line)
    if len(kind) > MAX_TYPE_CHARS:
        raise DatasetError(f"'{field}' has an entity type of {len(kind)} characters; at most {MAX_TYPE_CHARS} are "
                           "allowed", line)
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in kind):
        raise DatasetError(f"'{field}' contains a control or format character", line)


def _begin_orphans(tags: list[str], line: int, notes: _Notes) -> list[str]:
    """IOB2: an ``I-X`` with no ``X`` before it begins one (it becomes ``B-X``)."""
    out: list[str] = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (i == 0 or out[-1] == "O" or out[-1][2:] != tag[2:]):
            notes.add(f"line {line}: {tag} with no {tag[2:]} to continue begins an entity (IOB2)")
            tag = "B-" + tag[2:]
        out.append(tag)
    return out
