"""Which lines a batch's files hold, as a resuming runner reads them: the index, then the files' tails past it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelmeter.gateway.batch_runner import _append, _append_chunk, _written


def answer(custom_id: str) -> dict[str, Any]:
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": None, "error": None}


def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    return tmp_path / "output.jsonl", tmp_path / "errors.jsonl", tmp_path / "done.idx"


def test_chunks_written_through_the_index_are_found(tmp_path: Path) -> None:
    output, errors, index = files(tmp_path)
    _append_chunk(output, errors, index, ([answer("a"), answer("b")], [answer("c")]))
    _append_chunk(output, errors, index, ([answer("d")], []))
    assert _written(output, errors, index) == ({"a", "b", "c", "d"}, [3, 1])
    last = json.loads(index.read_bytes().splitlines()[-1])
    assert last["sizes"] == [output.stat().st_size, errors.stat().st_size]


def test_answers_written_before_a_crash_that_missed_the_index_are_found_in_the_tail(tmp_path: Path) -> None:
    output, errors, index = files(tmp_path)
    _append_chunk(output, errors, index, ([answer("a")], []))
    _append(output, [answer("b")])  # the runner died before the chunk's index line
    _append(errors, [answer("c")])
    assert _written(output, errors, index) == ({"a", "b", "c"}, [2, 1])


def test_torn_last_lines_are_cut_in_the_files_and_the_index(tmp_path: Path) -> None:
    output, errors, index = files(tmp_path)
    _append_chunk(output, errors, index, ([answer("a")], []))
    with output.open("ab") as f:
        f.write(b'{"id": "batch_req_b", "custom_id": "b", "resp')
    with index.open("ab") as f:
        f.write(b'{"sizes": [1')
    assert _written(output, errors, index) == ({"a"}, [1, 0])
    assert output.read_bytes().endswith(b"\n")
    assert index.read_bytes().endswith(b"\n")
    _append_chunk(output, errors, index, ([answer("b")], []))  # appends go on from clean line ends
    assert _written(output, errors, index) == ({"a", "b"}, [2, 0])


def test_a_file_torn_in_its_only_line_is_emptied(tmp_path: Path) -> None:
    output, errors, index = files(tmp_path)
    output.write_bytes(b"x" * 200_000)  # no newline anywhere: the cut walks back block by block
    assert _written(output, errors, index) == (set(), [0, 0])
    assert output.read_bytes() == b""


def test_files_without_an_index_are_read_whole(tmp_path: Path) -> None:
    output, errors, index = files(tmp_path)
    _append(output, [answer("a"), answer("b")])  # a batch begun before the index existed
    assert _written(output, errors, index) == ({"a", "b"}, [2, 0])
