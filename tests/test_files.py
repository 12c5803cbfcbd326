"""The one atomic file writer (shared_models/files.py) as a specification: real files in a temporary directory."""

from __future__ import annotations

import stat

import pytest

from shared_models.files import atomic_file, write_json_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_leaves_no_sibling(tmp_path):
    path = tmp_path / "ledger.json"
    write_json_atomic(path, {"spent": 1.5})
    write_json_atomic(path, {"spent": 2.0})
    assert path.read_text() == '{\n "spent": 2.0\n}\n'
    write_text_atomic(tmp_path / "ACTIVE", "v0002\n")
    assert (tmp_path / "ACTIVE").read_text() == "v0002\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ACTIVE", "ledger.json"]


def test_an_error_while_writing_leaves_the_old_file_as_it_was(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_file(path, newline="") as fh:
        fh.write("half of the new")
        raise RuntimeError("crash")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_binary_and_owner_only_files(tmp_path):
    path = tmp_path / "weights.pt"
    with atomic_file(path, "wb", owner_only=True) as fh:
        fh.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    # two writers interleaved (e.g. two processes fitting one normalisation): each writes its own sibling and
    # renames a whole file over the path; the last rename wins and no half of either is ever in place
    path = tmp_path / "normalizer.json"
    with atomic_file(path) as first:
        first.write("first, ")
        with atomic_file(path) as second:
            second.write("second, whole")
        assert path.read_text() == "second, whole"
        first.write("whole")
    assert path.read_text() == "first, whole"
    assert [p.name for p in tmp_path.iterdir()] == ["normalizer.json"]
