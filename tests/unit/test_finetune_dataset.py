"""Dataset parsing for fine-tuning: formats, every error with its line, the stratified split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from modelmeter.models.finetune.dataset import (
    DatasetError,
    Example,
    ParsedDataset,
    parse_dataset,
    sort_labels,
    stratified_split,
)


def parse(data: bytes | str, filename: str = "data.jsonl", **limits: int) -> ParsedDataset:
    raw = data.encode() if isinstance(data, str) else data
    options = {"max_rows": 1000, "max_text_chars": 200, "max_labels": 10} | limits
    return parse_dataset(raw, filename=filename, **options)


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def error_of(data: bytes | str, filename: str = "data.jsonl", **limits: int) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        parse(data, filename, **limits)
    return info.value


GOOD_JSONL = jsonl({"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"})


# Happy paths


def test_jsonl_with_string_labels_keeps_order_and_sorts_labels() -> None:
    parsed = parse(GOOD_JSONL + jsonl({"text": "fine", "label": "pos", "id": 7}))
    assert parsed.examples == [Example("great", "pos"), Example("awful", "neg"), Example("fine", "pos")]
    assert parsed.labels == ["neg", "pos"]


def test_jsonl_integer_labels_become_strings_sorted_numerically() -> None:
    parsed = parse(jsonl({"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": "-1"}))
    assert [ex.label for ex in parsed.examples] == ["10", "2", "-1"]
    assert parsed.labels == ["-1", "2", "10"]


def test_jsonl_skips_blank_lines_and_accepts_crlf() -> None:
    data = '\n{"text": "a", "label": 0}\r\n\r\n  \n{"text": "b", "label": 1}'
    assert parse(data).examples == [Example("a", "0"), Example("b", "1")]


def test_jsonl_text_may_hold_line_separator_characters() -> None:
    data = '{"text": "one\u2028two", "label": 0}\n{"text": "b", "label": 1}\n'
    assert parse(data).examples[0].text == "one\u2028two"


def test_csv_with_text_column_and_quoting() -> None:
    data = 'id,text,label\n1,"hello, world",pos\n2,"two\nlines ""quoted""",neg\n\n3,plain,pos\n'
    parsed = parse(data, "upload.csv")
    assert parsed.examples == [
        Example("hello, world", "pos"),
        Example('two\nlines "quoted"', "neg"),
        Example("plain", "pos"),
    ]
    assert parsed.labels == ["neg", "pos"]


def test_tsv_with_sentence_column_like_sst2() -> None:
    data = 'sentence\tlabel\nhide new secretions \t0\n"quoted" start\t1\r\n'
    parsed = parse(data, "train.tsv")
    assert parsed.examples == [Example("hide new secretions ", "0"), Example('"quoted" start', "1")]
    assert parsed.labels == ["0", "1"]


def test_header_names_are_case_and_space_insensitive() -> None:
    parsed = parse("Label, Text \n1,a\n0,b\n", "x.csv")
    assert parsed.examples == [Example("a", "1"), Example("b", "0")]


def test_utf8_bom_is_stripped() -> None:
    assert parse(b"\xef\xbb\xbftext,label\na,0\nb,1\n", "x.csv").examples[0] == Example("a", "0")
    assert parse(b"\xef\xbb\xbf" + GOOD_JSONL.encode()).examples[0] == Example("great", "pos")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (GOOD_JSONL, Example("great", "pos")),
        ("text\tlabel\na\t0\nb\t1\n", Example("a", "0")),
        ("text,label\na,0\nb,1\n", Example("a", "0")),
    ],
)
def test_format_is_sniffed_without_a_known_extension(data: str, expected: Example) -> None:
    assert parse(data, "upload.txt").examples[0] == expected
    assert parse(data, "upload").examples[0] == expected


def test_sort_labels() -> None:
    assert sort_labels(["10", "9", "-3"]) == ["-3", "9", "10"]
    assert sort_labels(["b", "10", "a", "9"]) == ["10", "9", "a", "b"]


def test_large_file_parses_quickly() -> None:
    rows = "".join(f"row number {i} is here\t{i % 3}\n" for i in range(200_000))
    parsed = parse("sentence\tlabel\n" + rows, "big.tsv", max_rows=200_000)
    assert len(parsed.examples) == 200_000
    assert parsed.labels == ["0", "1", "2"]


# Errors, each with its line


@pytest.mark.parametrize(
    ("data", "filename", "line", "fragment"),
    [
        (b"", "a.jsonl", None, "empty"),
        (b" \n\n", "a.csv", None, "empty"),
        (b"text,label\n", "a.csv", None, "no examples"),
        (b'{"text": "a", "label": 0}\n{"text": "\xff"}\n', "a.jsonl", 2, "UTF-8"),
        (b"text,label\na,0\nb,1\n\nc\xe9,1\n", "a.csv", 5, "UTF-8"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n', "a.jsonl", 2, "malformed JSON"),
        ('{"text": "a", "label": 0}\n\n["b", 1]\n', "a.jsonl", 3, "expected a JSON object, got an array"),
        ('{"text": "a", "label": 0}\n"b"\n', "a.jsonl", 2, "got a string"),
        ('{"text": "a", "label": 0}\n{"label": 1}\n', "a.jsonl", 2, "missing 'text'"),
        ('{"text": "a", "label": 0}\n{"text": "  ", "label": 1}\n', "a.jsonl", 2, "empty 'text'"),
        ('{"text": "a", "label": 0}\n{"text": 5, "label": 1}\n', "a.jsonl", 2, "'text' must be a string"),
        ('{"text": "a", "label": 0}\n{"text": "b"}\n', "a.jsonl", 2, "missing 'label'"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": ""}\n', "a.jsonl", 2, "empty 'label'"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": 1.0}\n', "a.jsonl", 2, "fraction"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": true}\n', "a.jsonl", 2, "boolean"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": null}\n', "a.jsonl", 2, "null"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": [1]}\n', "a.jsonl", 2, "array"),
        ('{"text": "a", "label": 0}\n{"text": "b", "label": {}}\n', "a.jsonl", 2, "an object"),
        ("text,label\na,0\n,1\n", "a.csv", 3, "empty 'text'"),
        ("sentence\tlabel\na\t0\n \t1\n", "a.tsv", 3, "empty 'sentence'"),
        ("text,label\na,0\nb,\n", "a.csv", 3, "missing 'label'"),
        ("text,label\na,0\nb,1,2\n", "a.csv", 3, "expected 2 columns, got 3"),
        ("text\tlabel\na\t0\n\nb\n", "a.tsv", 4, "expected 2 columns, got 1"),
        ('text,label\na,0\n"b,1\n', "a.csv", 3, "malformed CSV"),
        ('text,label\na,0\n"b"x,1\n', "a.csv", 3, "malformed CSV"),
        ("review,label\na,0\n", "a.csv", 1, "no text column"),
        ("\n\ntext,target\na,0\n", "a.csv", 3, "no 'label' column"),
        ("text label\na 0\n", "a.tsv", 1, "no text column"),
    ],
)
def test_errors_name_their_line(data: bytes | str, filename: str, line: int | None, fragment: str) -> None:
    error = error_of(data, filename)
    assert error.line == line
    assert fragment in error.message
    assert str(error) == (error.message if line is None else f"line {line}: {error.message}")


def test_error_str_format() -> None:
    error = error_of(GOOD_JSONL * 3 + jsonl({"text": "x"}))
    assert str(error) == "line 7: missing 'label'"


def test_multiline_csv_record_reports_the_line_it_starts_on() -> None:
    data = 'text,label\n"one\ntwo",0\n"three\nfour",1,9\n'
    assert error_of(data, "a.csv").line == 4


def test_text_longer_than_the_limit() -> None:
    error = error_of(GOOD_JSONL + jsonl({"text": "x" * 11, "label": "pos"}), max_text_chars=10)
    assert (error.line, "11 characters" in error.message) == (3, True)
    assert len(parse(GOOD_JSONL + jsonl({"text": "x" * 10, "label": "pos"}), max_text_chars=10).examples) == 3


def test_too_many_rows_names_the_first_row_over_the_limit() -> None:
    data = "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(5))
    assert len(parse(data, "a.csv", max_rows=5).examples) == 5
    error = error_of(data + "t5,1\n", "a.csv", max_rows=5)
    assert (error.line, "too many rows" in error.message) == (7, True)


def test_too_many_labels_names_the_line_of_the_first_extra_label() -> None:
    data = jsonl(*({"text": "t", "label": label} for label in ["a", "b", "a", "c", "d"]))
    assert parse(data, max_labels=4).labels == ["a", "b", "c", "d"]
    error = error_of(data, max_labels=3)
    assert (error.line, "too many distinct labels" in error.message) == (5, True)


def test_a_single_label_is_refused() -> None:
    error = error_of(jsonl({"text": "a", "label": 1}, {"text": "b", "label": 1}))
    assert error.line is None
    assert "at least 2 distinct labels" in error.message


# Stratified split


def make_examples(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label}-{i}", label) for label, n in counts.items() for i in range(n)]


def test_split_is_stratified_and_partitions_the_examples() -> None:
    examples = make_examples({"a": 100, "b": 50, "c": 10})
    rest, held = stratified_split(examples, fraction=0.2, seed=3)
    assert Counter(ex.label for ex in held) == {"a": 20, "b": 10, "c": 2}
    assert sorted(map(repr, rest + held)) == sorted(map(repr, examples))
    assert rest == [ex for ex in examples if ex in set(rest)]


def test_split_is_deterministic_and_depends_on_the_seed() -> None:
    examples = make_examples({"a": 40, "b": 40})
    assert stratified_split(examples, fraction=0.25, seed=1) == stratified_split(examples, fraction=0.25, seed=1)
    assert stratified_split(examples, fraction=0.25, seed=1) != stratified_split(examples, fraction=0.25, seed=2)


def test_split_keeps_one_example_per_side_for_small_labels() -> None:
    rest, held = stratified_split(make_examples({"a": 2, "b": 3, "c": 1, "d": 50}), fraction=0.01, seed=0)
    assert Counter(ex.label for ex in held) == {"a": 1, "b": 1, "d": 1}
    assert Counter(ex.label for ex in rest) == {"a": 1, "b": 2, "c": 1, "d": 49}
    _, held = stratified_split(make_examples({"a": 2, "b": 3}), fraction=0.99, seed=0)
    assert Counter(ex.label for ex in held) == {"a": 1, "b": 2}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_refuses_a_fraction_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(make_examples({"a": 4, "b": 4}), fraction=fraction, seed=0)
