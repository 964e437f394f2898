"""Atomic output: a failure leaves neither the file nor a temp file; success replaces the file whole."""

from __future__ import annotations

import os
import stat

import pytest

from onnxforge._atomic import atomic_path, atomic_write_bytes, atomic_write_text, check_output_path
from onnxforge.errors import OutputPathError


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_creates_the_file_with_its_content(tmp_path):
    dest = tmp_path / "out.bin"
    atomic_write_bytes(dest, b"\x00\x01payload")
    assert dest.read_bytes() == b"\x00\x01payload"
    assert _leftovers(tmp_path) == ["out.bin"]


def test_write_replaces_an_existing_file(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    atomic_write_text(dest, "new ✓")
    assert dest.read_text(encoding="utf-8") == "new ✓"
    assert _leftovers(tmp_path) == ["out.txt"]


def test_failure_inside_leaves_no_file_and_no_temp_file(tmp_path):
    dest = tmp_path / "out.onnx"
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_path(dest) as tmp:
            assert tmp.parent == tmp_path and tmp != dest
            tmp.write_bytes(b"half a model")
            raise RuntimeError("failed half-way")
    assert not dest.exists()
    assert _leftovers(tmp_path) == []


def test_failure_keeps_the_previous_file(tmp_path):
    dest = tmp_path / "out.onnx"
    dest.write_bytes(b"previous")
    with pytest.raises(ValueError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"new but broken")
            raise ValueError
    assert dest.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == ["out.onnx"]


def test_ctrl_c_inside_leaves_no_temp_file(tmp_path):
    dest = tmp_path / "out.onnx"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []


def test_missing_parent_folders_are_created(tmp_path):
    dest = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(dest, "hi")
    assert dest.read_text() == "hi"


def test_written_file_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "model.onnx", b"data")
    finally:
        os.umask(old)
    # mkstemp creates 0600 files; an output others cannot read would break serving as another user
    assert stat.S_IMODE((tmp_path / "model.onnx").stat().st_mode) == 0o644


def test_check_output_path_refuses_the_input(tmp_path):
    source = tmp_path / "in.onnx"
    source.write_bytes(b"x")
    with pytest.raises(OutputPathError, match="input"):
        check_output_path(source, source)
    link = tmp_path / "link.onnx"
    link.symlink_to(source)
    with pytest.raises(OutputPathError):
        check_output_path(link, source)


def test_check_output_path_refuses_a_folder_and_a_file_as_parent(tmp_path):
    with pytest.raises(OutputPathError, match="folder"):
        check_output_path(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputPathError):
        check_output_path(blocker / "out.onnx")


def test_check_output_path_accepts_a_new_path_and_creates_its_folder(tmp_path):
    out = check_output_path(tmp_path / "new" / "out.onnx", tmp_path / "missing-input.onnx")
    assert out == tmp_path / "new" / "out.onnx"
    assert (tmp_path / "new").is_dir()
    assert not out.exists()
