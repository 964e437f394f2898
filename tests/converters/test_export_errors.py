"""Bad input to `onnxforge export`: each a one-line error with the reason, exit code 2, no file."""

from __future__ import annotations

import textwrap
import uuid

import pytest

from onnxforge.cli import main


def _run(capfd, tmp_path, source, *extra):
    out = tmp_path / "out" / "model.onnx"
    code = main(["export", str(source), "-o", str(out), *extra])
    err = capfd.readouterr().err
    assert code == 2, err
    error_lines = [line for line in err.splitlines() if line.strip()]
    assert error_lines and error_lines[0].startswith("error:")
    assert len(error_lines) <= 2  # the error and at most a hint
    assert all(not line.startswith("hint") for line in error_lines[:1])
    assert "Traceback" not in err
    assert not out.exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == []  # no temp files, no external-data files
    return error_lines[0]


def _write(tmp_path, body):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_source_missing(tmp_path, capfd):
    line = _run(capfd, tmp_path, tmp_path / "nope.py:build")
    assert "no such file" in line


def test_source_file_missing(tmp_path, capfd):
    line = _run(capfd, tmp_path, tmp_path / "nope.pt")
    assert "no such file" in line


@pytest.mark.parametrize("returned", ["42", "{'weights': [1, 2]}", "(None, None)"])
def test_callable_returns_no_model(tmp_path, capfd, returned):
    path = _write(tmp_path, f"def build():\n    return {returned}\n")
    line = _run(capfd, tmp_path, f"{path}:build")
    assert "not a model" in line


def test_forward_fails_on_the_given_shapes(tmp_path, capfd):
    path = _write(tmp_path, """
        from torch import nn
        def build():
            return nn.Linear(4, 3)
    """)
    line = _run(capfd, tmp_path, f"{path}:build", "--input-shape", "input=2x5")
    assert "forward failed on inputs input=2x5" in line
    assert "mat1 and mat2 shapes cannot be multiplied" in line


def test_an_op_no_exporter_supports(tmp_path, capfd):
    """A custom op with no ONNX translation: dynamo finds no decomposition, TorchScript an unknown
    namespace; both failures are named in the one line."""
    namespace = f"onnxforge_test_{uuid.uuid4().hex[:8]}"
    path = _write(tmp_path, f"""
        import torch
        from torch import nn

        @torch.library.custom_op("{namespace}::mystery", mutates_args=())
        def mystery(x: torch.Tensor) -> torch.Tensor:
            return x.clone() * 2

        @mystery.register_fake
        def _(x):
            return torch.empty_like(x)

        class Mystery(nn.Module):
            def forward(self, x):
                return mystery(x) + 1

        def build():
            return Mystery(), (torch.randn(2, 3),)
    """)
    line = _run(capfd, tmp_path, f"{path}:build")
    assert "export failed with every exporter tried" in line
    assert "dynamo:" in line and "torchscript:" in line
    assert f"{namespace}" in line.split("torchscript:")[1]
    assert "mystery" in line.split("dynamo:")[1].split("torchscript:")[0]
