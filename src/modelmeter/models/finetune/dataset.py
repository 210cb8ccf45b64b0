"""Labeled text datasets for fine-tuning: parsing, validation and hold-out splits.

Accepted formats (chosen by the file extension ``.jsonl``/``.csv``/``.tsv``, else sniffed from the content):

- JSONL: one JSON object per non-blank line with ``"text"`` (a string) and ``"label"`` (a string or an
  integer). Extra keys are accepted and ignored, so exports that carry ids or metadata upload unchanged.
- CSV: a header row naming the text column (``text`` or ``sentence``) and the ``label`` column, then one
  row per example; RFC 4180 quoting (a quoted field may span lines).
- TSV: the same header, fields separated by tabs, one row per line and no quoting (the GLUE convention,
  so a text may contain quote characters as they are).

Every error raised for a file is a :class:`DatasetError` naming the 1-based line it concerns (the header is
line 1), or no line when it concerns the file as a whole.

Labels become the model's class names, kept in the registry every request reads: at most ``MAX_LABEL_CHARS``
characters, no control characters (issue 21: one tenant's 10 MB of labels slowed every tenant's registry reload
from 8 to 47 ms). A JSON line nested deeper than Python's recursion limit is refused by line, not a 500.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["jsonl", "csv", "tsv"]

TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMN = "label"
_INT_LABEL = re.compile(r"-?[0-9]+")
MAX_LABEL_CHARS = 100
_EXTENSIONS: dict[str, Format] = {"jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv", "tsv": "tsv"}


@dataclass(frozen=True)
class Example:
    """One labeled text; labels are strings (an integer label 1 becomes ``"1"``)."""

    text: str
    label: str


@dataclass(frozen=True)
class ParsedDataset:
    """The examples of a file in file order, and its distinct labels sorted (numerically when all ints)."""

    examples: list[Example]
    labels: list[str]


class DatasetError(Exception):
    """A dataset file that cannot be used, with the 1-based line it concerns (None: the whole file)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message, line)
        self.message = message
        self.line = line

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class _Limits:
    max_rows: int
    max_text_chars: int
    max_labels: int


def parse_dataset(data: bytes, *, filename: str, max_rows: int, max_text_chars: int, max_labels: int) -> ParsedDataset:
    """Parse and validate an uploaded dataset; raise :class:`DatasetError` on the first problem found."""
    limits = _Limits(max_rows=max_rows, max_text_chars=max_text_chars, max_labels=max_labels)
    text = decode_text(data)
    if not text.strip():
        raise DatasetError("file is empty")
    fmt = _detect_format(filename, text)
    rows = _jsonl_rows(text) if fmt == "jsonl" else _table_rows(text, fmt)
    return _collect(rows, limits)


def decode_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", line) from None
    return text.removeprefix("\ufeff")


def _detect_format(filename: str, text: str) -> Format:
    _, dot, suffix = filename.lower().rpartition(".")
    if dot and suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    first = text.lstrip()
    if first.startswith("{"):
        return "jsonl"
    header = first.split("\n", 1)[0]
    return "tsv" if "\t" in header else "csv"


def _collect(rows: Iterable[tuple[int, str, str]], limits: _Limits) -> ParsedDataset:
    examples: list[Example] = []
    seen: set[str] = set()
    for line, text, label in rows:
        _check_label(label, line)
        if len(examples) >= limits.max_rows:
            raise DatasetError(f"too many rows: at most {limits.max_rows} examples are allowed", line)
        if len(text) > limits.max_text_chars:
            raise DatasetError(
                f"'text' is {len(text)} characters long; at most {limits.max_text_chars} are allowed", line
            )
        if label not in seen:
            seen.add(label)
            if len(seen) > limits.max_labels:
                raise DatasetError(f"too many distinct labels: at most {limits.max_labels} are allowed", line)
        examples.append(Example(text=text, label=label))
    if not examples:
        raise DatasetError("file has no examples")
    if len(seen) < 2:
        raise DatasetError(f"at least 2 distinct labels are needed; found {len(seen)}")
    return ParsedDataset(examples=examples, labels=sort_labels(seen))


def _check_label(label: str, line: int) -> None:
    if len(label) > MAX_LABEL_CHARS:
        raise DatasetError(f"'label' is {len(label)} characters long; at most {MAX_LABEL_CHARS} are allowed", line)
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in label):
        raise DatasetError("'label' contains a control or format character", line)


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Sort labels numerically when every label is an integer, else lexicographically."""
    distinct = set(labels)
    if all(_INT_LABEL.fullmatch(label) for label in distinct):
        return sorted(distinct, key=lambda label: (int(label), label))
    return sorted(distinct)


# JSONL


def _jsonl_rows(text: str) -> Iterator[tuple[int, str, str]]:
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, legal inside JSON strings.
    for index, raw in enumerate(text.split("\n")):
        if raw.strip():
            yield _jsonl_row(raw, index + 1)


def json_object(raw: str, line: int) -> dict[str, Any]:
    """One JSONL line as an object, or a :class:`DatasetError` naming the line (malformed, too deep, not an
    object). Shared with the named-entity files (``tagged.py``)."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"malformed JSON: {exc.msg} (column {exc.colno})", line) from None
    except RecursionError:
        raise DatasetError("malformed JSON: nested too deeply", line) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"expected a JSON object, got {_json_type(obj)}", line)
    return obj


def _jsonl_row(raw: str, line: int) -> tuple[int, str, str]:
    obj = json_object(raw, line)
    return line, _json_text(obj, line), _json_label(obj, line)


def _json_text(obj: dict[str, Any], line: int) -> str:
    if "text" not in obj:
        raise DatasetError("missing 'text'", line)
    text = obj["text"]
    if not isinstance(text, str):
        raise DatasetError(f"'text' must be a string, got {_json_type(text)}", line)
    if not text.strip():
        raise DatasetError("empty 'text'", line)
    return text


def _json_label(obj: dict[str, Any], line: int) -> str:
    if "label" not in obj:
        raise DatasetError("missing 'label'", line)
    label = obj["label"]
    # bool is a subclass of int: true/false are rejected rather than read as 1/0.
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    if not isinstance(label, str):
        raise DatasetError(f"'label' must be a string or an integer, got {_json_type(label)}", line)
    if not label.strip():
        raise DatasetError("empty 'label'", line)
    return label.strip()


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {float: "a number with a fraction", int: "an integer", str: "a string", list: "an array"}
    return names.get(type(value), "an object")


# CSV / TSV


def _table_rows(text: str, fmt: Format) -> Iterator[tuple[int, str, str]]:
    records = _csv_records(text) if fmt == "csv" else _tsv_records(text)
    header_line, header = next(records, (1, []))
    text_col, label_col = _header_columns(header, header_line)
    for line, fields in records:
        if len(fields) != len(header):
            raise DatasetError(f"expected {len(header)} columns, got {len(fields)}", line)
        text = _table_text(fields[text_col], header[text_col], line)
        yield line, text, _table_label(fields[label_col], line)


def _csv_records(text: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DatasetError(f"malformed CSV: {exc}", start) from None
        if fields and any(field.strip() for field in fields):
            yield start, fields
        start = reader.line_num + 1


def _tsv_records(text: str) -> Iterator[tuple[int, list[str]]]:
    for index, raw in enumerate(text.split("\n")):
        raw = raw.removesuffix("\r")
        if raw.strip():
            yield index + 1, raw.split("\t")


def _header_columns(header: list[str], line: int) -> tuple[int, int]:
    names = [name.strip().lower() for name in header]
    text_col = next((names.index(name) for name in TEXT_COLUMNS if name in names), None)
    if text_col is None:
        raise DatasetError("header has no text column: name it 'text' or 'sentence'", line)
    if LABEL_COLUMN not in names:
        raise DatasetError("header has no 'label' column", line)
    return text_col, names.index(LABEL_COLUMN)


def _table_text(text: str, column: str, line: int) -> str:
    if not text.strip():
        raise DatasetError(f"empty '{column.strip()}'", line)
    return text


def _table_label(label: str, line: int) -> str:
    if not label.strip():
        raise DatasetError("missing 'label'", line)
    return label.strip()


# Hold-out split


def stratified_split(examples: list[Example], *, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off about ``fraction`` of each label's examples as a hold-out set: ``(rest, held_out)``.

    Deterministic under ``seed``. A label with at least 2 examples has at least one on each side; a label
    with a single example stays in ``rest``. Both sides keep the input order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
    rng = random.Random(seed)
    held: set[int] = set()
    for _, indices in sorted(_indices_by_label(examples).items()):
        rng.shuffle(indices)
        held.update(indices[: _held_count(len(indices), fraction)])
    rest = [ex for i, ex in enumerate(examples) if i not in held]
    return rest, [ex for i, ex in enumerate(examples) if i in held]


def _indices_by_label(examples: list[Example]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.label, []).append(index)
    return groups


def _held_count(n: int, fraction: float) -> int:
    if n < 2:
        return 0
    return min(max(round(n * fraction), 1), n - 1)
