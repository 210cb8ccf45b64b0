"""Which lines a batch's files hold, as a resuming runner reads them: the index, then the files' tails past it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelmeter.gateway.batch_runner import _append, _append_chunk, _written


def answer(custom_id: str) -> dict[str, Any]:
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": None, "error": None}


class Files:
    """A batch's output, error and index files, written as the runner writes them (counts kept as it keeps them)."""

    def __init__(self, tmp_path: Path) -> None:
        self.output, self.errors, self.index = (tmp_path / n for n in ("output.jsonl", "errors.jsonl", "done.idx"))
        self.lines = [0, 0]

    def chunk(self, ok: list[str], failed: list[str] | None = None) -> None:
        failed = failed or []
        self.lines = [self.lines[0] + len(ok), self.lines[1] + len(failed)]
        _append_chunk(self.output, self.errors, self.index, ([answer(i) for i in ok], [answer(i) for i in failed]),
                      self.lines)

    def resume(self) -> tuple[set[str], list[int]]:
        ids, self.lines = _written(self.output, self.errors, self.index)
        return ids, self.lines

    def index_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.index.read_bytes().splitlines()]


def test_chunks_written_through_the_index_are_found(tmp_path: Path) -> None:
    f = Files(tmp_path)
    f.chunk(["a", "b"], ["c"])
    f.chunk(["d"])
    assert f.resume() == ({"a", "b", "c", "d"}, [3, 1])
    last = f.index_lines()[-1]
    assert last["sizes"] == [f.output.stat().st_size, f.errors.stat().st_size]
    assert last["lines"] == [3, 1]


def test_answers_a_crash_left_out_of_the_index_are_found_and_then_indexed(tmp_path: Path) -> None:
    f = Files(tmp_path)
    f.chunk(["a"])
    _append(f.output, [answer("b")])  # the runner died before the chunk's index line
    _append(f.errors, [answer("c")])
    assert f.resume() == ({"a", "b", "c"}, [2, 1])
    assert f.index_lines()[-1]["ids"] == ["b", "c"]  # a catch-up line names them
    f.chunk(["d"])  # the next claim goes on; the one after must still know b and c
    assert f.resume() == ({"a", "b", "c", "d"}, [3, 1])


def test_an_index_ahead_of_its_files_is_cut_back_to_what_they_hold(tmp_path: Path) -> None:
    f = Files(tmp_path)
    f.chunk(["a"])
    f.chunk(["b"])
    data = f.output.read_bytes()
    f.output.write_bytes(data[: data.index(b"\n") + 1])  # the second chunk's answer is lost from the file
    assert f.resume() == ({"a"}, [1, 0])  # "b" is served again, not taken for done
    assert [entry["ids"] for entry in f.index_lines()] == [["a"]]
    f.chunk(["b"])
    assert f.resume() == ({"a", "b"}, [2, 0])


def test_torn_last_lines_are_cut_in_the_files_and_the_index(tmp_path: Path) -> None:
    f = Files(tmp_path)
    f.chunk(["a"])
    with f.output.open("ab") as out:
        out.write(b'{"id": "batch_req_b", "custom_id": "b", "resp')
    with f.index.open("ab") as idx:
        idx.write(b'{"sizes": [1')
    assert f.resume() == ({"a"}, [1, 0])
    assert f.output.read_bytes().endswith(b"\n")
    assert f.index.read_bytes().endswith(b"\n")
    f.chunk(["b"])  # appends go on from clean line ends
    assert f.resume() == ({"a", "b"}, [2, 0])


def test_a_file_torn_in_its_only_line_is_emptied(tmp_path: Path) -> None:
    f = Files(tmp_path)
    f.output.write_bytes(b"x" * 200_000)  # no newline anywhere: the cut walks back block by block
    assert f.resume() == (set(), [0, 0])
    assert f.output.read_bytes() == b""


def test_files_without_an_index_are_read_once_then_indexed(tmp_path: Path) -> None:
    f = Files(tmp_path)
    _append(f.output, [answer("a"), answer("b")])  # a batch begun before the index existed
    assert f.resume() == ({"a", "b"}, [2, 0])
    assert f.index_lines() == [{"sizes": [f.output.stat().st_size, 0], "lines": [2, 0], "ids": ["a", "b"]}]
