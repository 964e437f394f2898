"""Model files that would run code when loaded: a ``.pt2`` whose weights or sample inputs are pickles
with a ``__reduce__`` that creates a marker file, and a pickled object saved as a TorchScript ``.pt``.

Each is first shown to be live (torch itself, loading it unguarded, creates the marker), then
``onnxforge export`` must refuse it: exit 2, one ``error:`` line naming the member, no marker, no
output, the input unchanged.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_bad_inputs import one_error_line, run_cli, untouched  # noqa: F401


class CreatesMarker:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def _saved_program(path: Path) -> Path:
    torch.manual_seed(0)
    torch.export.save(torch.export.export(Tiny().eval(), (torch.randn(1, 3),)), str(path))
    return path


def _torch_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(CreatesMarker(marker), buffer)
    return buffer.getvalue()


def _rewrite(path: Path, change) -> None:
    """Rewrite the archive's members through ``change(relative name, bytes) -> bytes``."""
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(name, change(name.split("/", 1)[1], data))


def _pickled_weight(path: Path, marker: Path) -> str:
    """The first weight stored as a pickle (``"use_pickle": true``) that opens the marker."""
    def change(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return _torch_pickle(marker)
        return data

    _rewrite(path, change)
    return "data/weights/weight_0"


def _pickled_sample_inputs(path: Path, marker: Path) -> str:
    _rewrite(path, lambda name, data: _torch_pickle(marker) if name == "data/sample_inputs/model.pt" else data)
    return "data/sample_inputs/model.pt"


PT2_CASES = {"use_pickle_weight": _pickled_weight, "pickled_sample_inputs": _pickled_sample_inputs}


@pytest.mark.parametrize("case", sorted(PT2_CASES))
def test_pt2_with_a_code_running_pickle_is_refused(run_cli, tmp_path, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    marker = tmp_path / "marker"
    program = _saved_program(inputs / "tiny.pt2")
    member = PT2_CASES[case](program, marker)

    # the control: torch unguarded runs the pickle, then fails on what it built, each case in its own way
    # (an AssertionError, a SpecViolationError, varying with torch's version): any failure will do
    with pytest.raises(Exception):  # noqa: B017
        torch.export.load(str(program))
    assert marker.exists(), "the crafted archive does not run its pickle; the test would prove nothing"
    marker.unlink()

    output = tmp_path / "out" / "tiny.onnx"
    with untouched(inputs):
        code, err = run_cli("export", program, "-o", output)
    assert code == 2, err
    one_error_line(err, "tiny.pt2", member, "refusing")
    assert not marker.exists(), "loading the .pt2 ran code"
    assert not output.exists()


def test_a_plain_pt2_still_loads(run_cli, tmp_path):
    """The control for the cases above: torch.export.save's own output passes the check."""
    program = _saved_program(tmp_path / "tiny.pt2")
    code, err = run_cli("export", program, "-o", tmp_path / "tiny.onnx")
    assert code == 0, err


def test_pickle_named_as_torchscript_never_runs(run_cli, tmp_path):
    """A .pt goes to torch.jit.load, which reads TorchScript archives and never unpickles Python objects."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    marker = tmp_path / "marker"
    (inputs / "model.pt").write_bytes(_torch_pickle(marker))
    with untouched(inputs):
        code, err = run_cli("export", inputs / "model.pt", "-o", tmp_path / "out.onnx", "--input-shape", "x=1x3")
    assert code == 2, err
    one_error_line(err, "model.pt", "TorchScript")
    assert not marker.exists()
