"""Faults while writing: a full disk, a read-only file system, a permission denied or a name too long
are exit 2 with the path and the reason (not an internal error), leave no output and no temp file,
and a recipe stage that meets one is recorded in the manifest as failed, with the reason.

The faults are injected where the kernel reports them (``os.fsync``, a file write); long names are
real.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_classifier
from test_bad_inputs import one_error_line, run_cli, untouched  # noqa: F401

FAULTS = [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.ENAMETOOLONG]


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    path = folder / "model.onnx"
    path.write_bytes(make_classifier().SerializeToString())
    return path


def _fail_with(monkeypatch, code: int) -> None:
    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("code", FAULTS, ids=[errno.errorcode[c] for c in FAULTS])
def test_write_fault_is_exit_2_with_path_and_reason(run_cli, model, tmp_path, monkeypatch, code):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _fail_with(monkeypatch, code)
    with untouched(tmp_path):
        status, err = run_cli("simplify", model, "-o", out_dir / "simple.onnx")
    assert status == 2, err
    one_error_line(err, "cannot write", str(out_dir / "simple.onnx"), os.strerror(code))


def test_fault_in_a_library_write_names_the_file(run_cli, model, monkeypatch):
    """An OSError our writers never saw (a library's temp file in a full $TMPDIR) is still exit 2."""
    import onnxforge.inspection

    def full_disk(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/ort.quant.x/augmented.onnx")

    monkeypatch.setattr(onnxforge.inspection, "inspect_model", full_disk)
    status, err = run_cli("inspect", model)
    assert status == 2, err
    one_error_line(err, "/tmp/ort.quant.x/augmented.onnx", "No space left on device")


def test_an_output_name_of_250_characters_works(run_cli, model, tmp_path):
    """The temp file beside it used to be '.<name>.<random>.tmp', past the 255-byte limit."""
    output = tmp_path / ("m" * 245 + ".onnx")
    status, err = run_cli("simplify", model, "-o", output)
    assert status == 0, err
    assert output.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["inputs", output.name])


def test_an_output_name_past_255_bytes_is_refused_before_any_work(run_cli, model, tmp_path):
    output = tmp_path / ("m" * 251 + ".onnx")
    with untouched(tmp_path):
        status, err = run_cli("simplify", model, "-o", output)
    assert status == 2, err
    one_error_line(err, "File name too long")


def test_a_stage_failing_to_write_is_recorded_in_the_manifest(run_cli, model, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\nstages: [simplify, {{prune: {{sparsity: 0.2}}}}]\n")
    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".02_prune.onnx."):  # the prune stage's temp file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    run_dir = tmp_path / "run"
    status, err = run_cli("run", recipe, "-o", run_dir)
    assert status == 2, err
    one_error_line(err, "02_prune.onnx", "No space left on device")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(s["name"], s["status"]) for s in manifest["stages"]] == [("simplify", "done"), ("prune", "failed")]
    assert "No space left on device" in manifest["stages"][1]["error"]
    assert not (run_dir / "02_prune.onnx").exists()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], "temp files left in the run folder"
