"""Named-entity training files (``finetune.tagged``): both row forms, IOB2 repair, and errors that name the line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from modelmeter.models.finetune.dataset import DatasetError
from modelmeter.models.finetune.tagged import (
    MAX_NOTES,
    MAX_TYPES,
    TaggedDataset,
    TaggedExample,
    looks_tagged,
    parse_tagged,
)

SENTENCE = "Anna Berg flew to New York, then Oslo."
TOKENS = ["Anna", "Berg", "flew", "to", "New", "York", ",", "then", "Oslo", "."]
TAGS = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O", "O", "B-LOC", "O"]
SPANS = [{"start": 0, "end": 9, "label": "PER"}, {"start": 18, "end": 26, "label": "LOC"},
         {"start": 33, "end": 37, "label": "LOC"}]
TOKEN_ROW = {"tokens": TOKENS, "tags": TAGS}
SPAN_ROW = {"text": SENTENCE, "entities": SPANS}


def jsonl(*rows: Any) -> bytes:
    return "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows).encode()


def parse(data: bytes, *, max_rows: int = 1000, max_text_chars: int = 1000) -> TaggedDataset:
    return parse_tagged(data, max_rows=max_rows, max_text_chars=max_text_chars)


def error(data: bytes, **limits: int) -> DatasetError:
    with pytest.raises(DatasetError) as caught:
        parse(data, **limits)
    return caught.value


def test_token_rows_parse_with_types_and_the_model_labels() -> None:
    parsed = parse(jsonl(TOKEN_ROW, {"tokens": ["IBM"], "tags": ["B-ORG"], "id": 7}))
    assert parsed.examples == [TaggedExample(tuple(TOKENS), tuple(TAGS)), TaggedExample(("IBM",), ("B-ORG",))]
    assert parsed.types == ["LOC", "ORG", "PER"]
    assert parsed.tags == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert parsed.notes == []


def test_both_forms_give_the_same_examples_for_the_same_sentence() -> None:
    assert parse(jsonl(SPAN_ROW)) == parse(jsonl(TOKEN_ROW))


def test_a_span_tags_every_word_it_overlaps_and_punctuation_is_a_word() -> None:
    # "Zoë's" is three words for BERT ("Zoë", "'", "s"); a span over part of a word tags the whole word.
    text = "Zoë's café in São Paulo"
    row = {"text": text, "entities": [{"start": 0, "end": 2, "label": "PER"},
                                      {"start": text.index("São"), "end": len(text), "label": "LOC"}]}
    (example,) = parse(jsonl(row)).examples
    assert example == TaggedExample(("Zoë", "'", "s", "café", "in", "São", "Paulo"),
                                    ("B-PER", "O", "O", "O", "O", "B-LOC", "I-LOC"))


def test_a_sentence_without_entities_is_all_o_and_adjacent_same_type_spans_stay_apart() -> None:
    rows = [{"text": "nothing here", "entities": []},
            {"text": "Anna Berg", "entities": [{"start": 0, "end": 4, "label": "PER"},
                                               {"start": 5, "end": 9, "label": "PER"}]}]
    assert [ex.tags for ex in parse(jsonl(*rows)).examples] == [("O", "O"), ("B-PER", "B-PER")]


def test_an_orphan_i_begins_an_entity_as_iob2_reads_it() -> None:
    rows = [TOKEN_ROW,
            {"tokens": ["Anna", "in", "Oslo", "Norway"], "tags": ["I-PER", "O", "I-LOC", "I-LOC"]},
            {"tokens": ["Bank", "Oslo"], "tags": ["B-ORG", "I-LOC"]}]
    parsed = parse(jsonl(*rows))
    assert parsed.examples[1].tags == ("B-PER", "O", "B-LOC", "I-LOC")
    assert parsed.examples[2].tags == ("B-ORG", "B-LOC")
    assert parsed.notes == ["line 2: I-PER with no PER to continue begins an entity (IOB2)",
                            "line 2: I-LOC with no LOC to continue begins an entity (IOB2)",
                            "line 3: I-LOC with no LOC to continue begins an entity (IOB2)"]


def test_notes_are_capped_with_a_count() -> None:
    rows = [{"tokens": ["Anna"], "tags": ["I-PER"]}] * (MAX_NOTES + 5)
    notes = parse(jsonl(*rows)).notes
    assert len(notes) == MAX_NOTES + 1
    assert notes[0] == "line 1: I-PER with no PER to continue begins an entity (IOB2)"
    assert notes[-1] == "... and 5 more"


def test_blank_lines_a_bom_and_crlf_are_accepted() -> None:
    data = b"\xef\xbb\xbf" + jsonl(TOKEN_ROW).replace(b"\n", b"\r\n") + b"\r\n\r\n" + jsonl(TOKEN_ROW) + b"\n"
    assert len(parse(data).examples) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", "malformed JSON: Expecting property name enclosed in double quotes (column 2)"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ({"sentence": "x"}, "expected 'tokens' and 'tags', or 'text' and 'entities'"),
        ({"tokens": [], "tags": []}, "'tokens' is empty"),
        ({"tokens": ["a", 3], "tags": ["O", "O"]}, "'tokens[1]' must be a string, got an integer"),
        ({"tokens": ["a", " "], "tags": ["O", "O"]}, "'tokens[1]' is empty or blank"),
        ({"tokens": "a b", "tags": ["O"]}, "'tokens' must be an array of strings, got a string"),
        ({"tokens": ["a"]}, "missing 'tags'"),
        ({"tokens": ["a", "b"], "tags": ["O"]}, "'tags' has 1 items and 'tokens' 2: one tag per token"),
        ({"tokens": ["a"], "tags": ["S-PER"]}, "'tags[0]' is 'S-PER': expected IOB2 tags (O, B-TYPE, I-TYPE)"),
        ({"tokens": ["a"], "tags": ["PER"]}, "'tags[0]' is 'PER': expected IOB2 tags (O, B-TYPE, I-TYPE)"),
        ({"tokens": ["a"], "tags": ["B-"]}, "'tags[0]' has an empty entity type"),
        ({"tokens": ["a"], "tags": ["B-" + "X" * 51]},
         "'tags[0]' has an entity type of 51 characters; at most 50 are allowed"),
        ({"tokens": ["a"], "tags": ["B-P\u200bER"]}, "'tags[0]' contains a control or format character"),
        ({"text": "", "entities": []}, "'text' is empty or blank"),
        ({"text": "  \t ", "entities": []}, "'text' is empty or blank"),
        ({"text": 5, "entities": []}, "'text' must be a string, got an integer"),
        ({"text": "Anna"}, "missing 'entities'"),
        ({"entities": []}, "missing 'text'"),
        ({"text": "Anna", "entities": {}}, "'entities' must be an array, got an object"),
        ({"text": "Anna", "entities": ["PER"]}, "'entities[0]' must be an object, got a string"),
        ({"text": "Anna", "entities": [{"start": 0, "end": 5, "label": "PER"}]},
         "'entities[0]' is 0-5: spans need 0 <= start < end <= 4 (the length of 'text')"),
        ({"text": "Anna", "entities": [{"start": -1, "end": 2, "label": "PER"}]},
         "'entities[0]' is -1-2: spans need 0 <= start < end <= 4 (the length of 'text')"),
        ({"text": "Anna", "entities": [{"start": 2, "end": 2, "label": "PER"}]},
         "'entities[0]' is 2-2: spans need 0 <= start < end <= 4 (the length of 'text')"),
        ({"text": "Anna", "entities": [{"start": 3, "end": 1, "label": "PER"}]},
         "'entities[0]' is 3-1: spans need 0 <= start < end <= 4 (the length of 'text')"),
        ({"text": "Anna", "entities": [{"start": True, "end": 4, "label": "PER"}]},
         "'entities[0].start' must be an integer, got a boolean"),
        ({"text": "Anna", "entities": [{"start": 0, "end": 4.0, "label": "PER"}]},
         "'entities[0].end' must be an integer, got a number with a fraction"),
        ({"text": "Anna", "entities": [{"start": "0", "end": 4, "label": "PER"}]},
         "'entities[0].start' must be an integer, got a string"),
        ({"text": "Anna", "entities": [{"end": 4, "label": "PER"}]},
         "'entities[0].start' must be an integer, got null"),
        ({"text": "Anna", "entities": [{"start": 0, "end": 4}]}, "'entities[0].label' must be a string, got null"),
        ({"text": "Anna", "entities": [{"start": 0, "end": 4, "label": " "}]},
         "'entities[0].label' has an empty entity type"),
        ({"text": "Anna", "entities": [{"start": 0, "end": 4, "label": "P" * 51}]},
         "'entities[0].label' has an entity type of 51 characters; at most 50 are allowed"),
        ({"text": "Anna", "entities": [{"start": 0, "end": 4, "label": "PE\nR"}]},
         "'entities[0].label' contains a control or format character"),
        ({"text": "Anna Berg went", "entities": [{"start": 5, "end": 14, "label": "X"},
                                                 {"start": 0, "end": 6, "label": "PER"}]},
         "'entities[1]' (0-6) overlaps 'entities[0]' (5-14)"),
        ({"text": "Anna Berg", "entities": [{"start": 0, "end": 4, "label": "PER"},
                                            {"start": 2, "end": 3, "label": "PER"}]},
         "'entities[1]' (2-3) overlaps 'entities[0]' (0-4)"),
        ({"text": "AnnaBerg", "entities": [{"start": 0, "end": 4, "label": "PER"},
                                           {"start": 4, "end": 8, "label": "PER"}]},
         "'entities[1]' (4-8) shares the word 'AnnaBerg' with another entity: spans are tagged by whole words"),
        ({"text": "Anna  Berg", "entities": [{"start": 4, "end": 6, "label": "PER"}]},
         "'entities[0]' (4-6) covers no word of 'text'"),
    ],
)
def test_a_bad_row_names_its_line_and_field(row: Any, message: str) -> None:
    spans = isinstance(row, dict) and "tokens" not in row and ("text" in row or "entities" in row)
    good = SPAN_ROW if spans else TOKEN_ROW
    # A blank line first: lines are counted in the file, blank ones included.
    caught = error(jsonl(good, "", row))
    assert (caught.line, caught.message) == (3, message)
    assert str(caught) == f"line 3: {message}"


def test_json_nested_past_the_recursion_limit_names_its_line() -> None:
    deep = "[" * (sys.getrecursionlimit() + 10) + "]" * (sys.getrecursionlimit() + 10)
    caught = error(jsonl(TOKEN_ROW, '{"tokens": ' + deep + "}"))
    assert (caught.line, caught.message) == (2, "malformed JSON: nested too deeply")


def test_invalid_utf8_names_its_line() -> None:
    caught = error(jsonl(TOKEN_ROW) + b"\n" + b'{"tokens": ["\xff"], "tags": ["O"]}')
    assert (caught.line, caught.message) == (2, "not valid UTF-8 (byte 0xff)")


def test_a_file_mixing_the_forms_names_the_first_row_of_the_other_form() -> None:
    caught = error(jsonl(TOKEN_ROW, TOKEN_ROW, "", SPAN_ROW, TOKEN_ROW))
    assert (caught.line, caught.message) == (4, "this row has 'text' but line 1 has 'tokens': one form per file")
    caught = error(jsonl(SPAN_ROW, TOKEN_ROW))
    assert (caught.line, caught.message) == (2, "this row has 'tokens' but line 1 has 'text': one form per file")


def test_row_limit() -> None:
    assert len(parse(jsonl(TOKEN_ROW, TOKEN_ROW), max_rows=2).examples) == 2
    caught = error(jsonl(TOKEN_ROW, TOKEN_ROW, TOKEN_ROW), max_rows=2)
    assert (caught.line, caught.message) == (3, "too many rows: at most 2 sentences are allowed")


def test_text_length_limit_counts_the_text_or_the_tokens_joined_by_spaces() -> None:
    joined = len(" ".join(TOKENS))
    assert parse(jsonl(TOKEN_ROW), max_text_chars=joined).examples
    caught = error(jsonl(TOKEN_ROW, TOKEN_ROW), max_text_chars=joined - 1)
    assert (caught.line, caught.message) == (
        1, f"'tokens' joined by spaces are {joined} characters long; at most {joined - 1} are allowed")
    assert parse(jsonl(SPAN_ROW), max_text_chars=len(SENTENCE)).examples
    caught = error(jsonl(SPAN_ROW), max_text_chars=len(SENTENCE) - 1)
    assert (caught.line, caught.message) == (
        1, f"'text' is {len(SENTENCE)} characters long; at most {len(SENTENCE) - 1} are allowed")


def test_at_most_max_types_entity_types() -> None:
    rows = [{"tokens": ["a"], "tags": [f"B-T{i}"]} for i in range(MAX_TYPES)]
    assert len(parse(jsonl(*rows)).types) == MAX_TYPES
    caught = error(jsonl(*rows, {"tokens": ["a", "b"], "tags": ["B-T0", "I-EXTRA"]}))
    assert (caught.line, caught.message) == (MAX_TYPES + 1, f"too many entity types: at most {MAX_TYPES} are allowed")


@pytest.mark.parametrize("data", [b"", b"\n \n", b"\xef\xbb\xbf\n"])
def test_a_file_without_rows(data: bytes) -> None:
    caught = error(data)
    assert (caught.line, caught.message) == (None, "file has no sentences")


def test_a_file_without_entities() -> None:
    caught = error(jsonl({"tokens": ["a"], "tags": ["O"]}))
    assert (caught.line, caught.message) == (None, "no entities in the file: at least one tag other than O is needed")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (jsonl(TOKEN_ROW), True),
        (b"\n  \n" + jsonl(SPAN_ROW), True),
        (jsonl({"text": "x", "entities": []}), True),
        (b"\xef\xbb\xbf" + jsonl(TOKEN_ROW), True),
        (jsonl({"text": "good film", "label": "pos"}, TOKEN_ROW), False),
        (b"text,label\nx,pos\n", False),
        (b"{broken", False),
        (b"[1]", False),
        (b"", False),
    ],
)
def test_looks_tagged_reads_the_first_row(data: bytes, expected: bool) -> None:
    assert looks_tagged(data) is expected


def test_conll_2003_rows_parse(shared_data: Path) -> None:
    path = shared_data / "conll2003" / "train.jsonl"
    with path.open("rb") as f:
        head = b"".join(next(f) for _ in range(200))
    parsed = parse(head, max_text_chars=10_000)
    assert len(parsed.examples) == 200
    assert parsed.types == ["LOC", "MISC", "ORG", "PER"]
    assert parsed.tags == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert parsed.notes == []  # already IOB2
    first = json.loads(head.split(b"\n", 1)[0])
    assert parsed.examples[0] == TaggedExample(tuple(first["tokens"]), tuple(first["tags"]))
