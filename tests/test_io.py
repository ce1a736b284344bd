"""flan_rlhf.io: the atomic file and folder writers, the suffix -> format table and the text checks."""
from __future__ import annotations

import os

import pytest

from flan_rlhf.checkpointing import partial_writes
from flan_rlhf.io import (
    DATASETS_BUILDERS,
    FORMATS,
    TextFileError,
    atomic_file,
    atomic_folder,
    file_format,
    read_utf8,
    refuse_binary,
    table_format,
)


# ------------------------------------------------------------------ atomic_file
def test_atomic_file_writes_the_new_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n", encoding="utf-8")
    with atomic_file(path) as handle:
        handle.write("caf\u00e9\n")
    assert path.read_bytes() == "caf\u00e9\n".encode("utf-8")
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_atomic_file_keeps_the_old_content_when_the_block_raises(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):  # BaseException too: a Ctrl-C mid-write
        with atomic_file(path) as handle:
            handle.write("half of the new")
            raise KeyboardInterrupt
    assert path.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_atomic_file_that_fails_leaves_no_file_where_there_was_none(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "new.txt") as handle:
            handle.write("x")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []


def test_atomic_file_temporary_name_is_the_one_resume_ignores(tmp_path):
    """While writing, the only new file is ``<path>.tmp-<pid>``: what a kill would leave behind."""
    path = tmp_path / "last.ckpt"
    with atomic_file(path, "wb") as handle:
        handle.write(b"\x00\x01")
        assert os.listdir(tmp_path) == [f"last.ckpt.tmp-{os.getpid()}"]
        assert partial_writes(str(tmp_path)) == [f"{path}.tmp-{os.getpid()}"]
    assert path.read_bytes() == b"\x00\x01" and partial_writes(str(tmp_path)) == []


def test_atomic_file_creates_the_parent_and_refuses_a_folder(tmp_path):
    with atomic_file(tmp_path / "a" / "b" / "c.txt", newline="\n") as handle:
        handle.write("one\ntwo\n")
    assert (tmp_path / "a" / "b" / "c.txt").read_bytes() == b"one\ntwo\n"
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="Is a directory"):
        with atomic_file(tmp_path / "folder") as handle:
            handle.write("x")
    assert os.listdir(tmp_path / "folder") == [] and sorted(os.listdir(tmp_path)) == ["a", "folder"]


# ------------------------------------------------------------------ atomic_folder
def test_atomic_folder_replaces_an_existing_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with atomic_folder(out) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".out.tmp-")
        assert sorted(os.listdir(out)) == ["old.bin"]  # untouched while the block runs
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "new.bin"), "w") as handle:
            handle.write("new")
    assert sorted(os.listdir(out)) == ["sub"] and (out / "sub" / "new.bin").read_text() == "new"
    assert os.listdir(tmp_path) == ["out"]  # no temporary or .old folder left behind


def test_atomic_folder_leaves_the_folder_untouched_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            with open(os.path.join(tmp, "half.bin"), "w") as handle:
                handle.write("half")
            raise RuntimeError("disk full")
    assert os.listdir(out) == ["old.bin"] and (out / "old.bin").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_folder_creates_a_new_folder_and_its_parent(tmp_path):
    with atomic_folder(tmp_path / "deep" / "out") as tmp:
        with open(os.path.join(tmp, "a.txt"), "w") as handle:
            handle.write("a")
    assert os.listdir(tmp_path / "deep") == ["out"] and (tmp_path / "deep" / "out" / "a.txt").read_text() == "a"


# ------------------------------------------------------------------ formats
def test_one_table_maps_suffixes_of_any_case_to_formats_and_builders():
    assert file_format("dir.d/Train.JSONL") == "jsonl" and file_format("x.tsv") == "tsv"
    assert file_format("x.xlsx") is None and file_format("jsonl") is None
    assert {DATASETS_BUILDERS[FORMATS[s]] for s in (".jsonl", ".json")} == {"json"}
    assert DATASETS_BUILDERS["tsv"] == "csv" and "txt" not in DATASETS_BUILDERS


def test_an_unknown_suffix_is_one_line_naming_the_file_and_the_choices(tmp_path):
    assert table_format(tmp_path / "t.CSV", (".jsonl", ".csv")) == "csv"
    with pytest.raises(ValueError) as caught:
        table_format(tmp_path / "t.xlsx", (".jsonl", ".json", ".csv"))
    assert str(caught.value) == f"cannot read {tmp_path / 't.xlsx'} (suffix '.xlsx'): use .jsonl, .json or .csv"
    with pytest.raises(ValueError, match=r"^cannot read my file \(suffix '\.tsv'\): use \.csv$"):
        table_format("t.tsv", (".csv",), what="my file")  # known to the table, not accepted by this reader


# ------------------------------------------------------------------ text checks
def test_a_binary_file_is_one_line_naming_it(tmp_path):
    binary = tmp_path / "texts.csv"
    binary.write_bytes(b"a,b\n1,2\n" + bytes(range(256)))
    with pytest.raises(TextFileError) as caught:
        refuse_binary(binary)
    err = caught.value
    assert (err.problem, err.line, err.offset, err.byte) == ("binary", 3, 8, 0)
    assert str(err) == f"{binary} is binary, not text (line 3, byte 8: NUL byte)"
    text = tmp_path / "texts.txt"
    text.write_text("caf\u00e9\n", encoding="utf-8")
    refuse_binary(text)  # no error


def test_a_file_that_is_not_utf8_is_one_line_naming_the_line_and_byte(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(TextFileError) as caught:
        read_utf8(path)
    err = caught.value
    assert (err.problem, err.line, err.offset, err.byte) == ("not UTF-8", 2, 22, 0xE9)
    assert str(err) == f"{path} is not valid UTF-8 (line 2, byte 22: invalid continuation byte)"
    assert "\n" not in str(err) and isinstance(err, ValueError)
    path.write_bytes('{"a": "caf\u00e9"}\r\n'.encode("utf-8"))
    assert read_utf8(path) == '{"a": "caf\u00e9"}\r\n'  # the text as it is in the file
