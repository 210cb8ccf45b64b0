"""How tests find the shared data: MODELMETER_SHARED_DATA wins; a missing or partial copy gives one reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import shared_data


def test_the_env_var_names_the_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELMETER_SHARED_DATA", str(tmp_path))
    assert shared_data.shared_data_dir() == tmp_path


def test_without_it_the_folder_is_shared_data_beside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELMETER_SHARED_DATA", raising=False)
    monkeypatch.delenv("MODELMETER_SHARED_DIR", raising=False)
    repo = Path(__file__).resolve().parents[2]
    assert shared_data.shared_data_dir() == repo.parent / "shared" / "data"


def test_a_missing_or_partial_copy_is_named_and_a_whole_one_is_not(tmp_path: Path) -> None:
    absent = shared_data.missing_reason(tmp_path / "nowhere")
    assert absent is not None
    assert "lacks sst2/train.tsv, conll2003/train.jsonl" in absent
    assert "MODELMETER_SHARED_DATA" in absent
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\ndull\t0\n")
    partial = shared_data.missing_reason(tmp_path)
    assert partial is not None
    assert f"{tmp_path} lacks conll2003/train.jsonl (set" in partial
    (tmp_path / "conll2003").mkdir()
    (tmp_path / "conll2003" / "train.jsonl").write_text("{}\n")
    assert shared_data.missing_reason(tmp_path) is None
    assert sorted(shared_data.sst2_rows(tmp_path, 5)) == [("dull", 0), ("fine", 1)]
