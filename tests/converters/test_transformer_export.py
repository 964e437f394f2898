"""A small nn.TransformerEncoder exported with a dynamic batch and sequence: the converter checks
parity at two sequence lengths, and so does this test, independently, at a third."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnxforge.cli import main

ENCODER_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 4)

        def forward(self, tokens):
            return self.head(self.encoder(self.embed(tokens)))

    def build():
        torch.manual_seed(0)
        return Encoder().eval(), {"tokens": torch.randint(0, 50, (2, 7))}
    """
)


@pytest.fixture
def encoder_file(tmp_path):
    path = tmp_path / "encoder.py"
    path.write_text(ENCODER_SOURCE)
    return path


def _torch_model(path):
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["build"]()[0]


def _export(encoder_file, out, *extra):
    report = out.with_suffix(".json")
    code = main([
        "export", f"{encoder_file}:build", "-o", str(out),
        "--dynamic-batch", "--dynamic", "tokens=1:sequence", "--json", str(report), *extra,
    ])
    return code, (json.loads(report.read_text()) if report.exists() else None)


def test_dynamic_batch_and_sequence_keep_parity(encoder_file, tmp_path):
    out = tmp_path / "encoder.onnx"
    code, result = _export(encoder_file, out)
    assert code == 0
    assert result["exporter"] == "dynamo"
    assert result["verified"] is True
    assert result["parity"]["batch_sizes"] == [1, 3]
    # the converter ran two different sequence lengths, not just two batch sizes
    assert result["parity_inputs"] == ["tokens 1x7", "tokens 3x6"]
    assert result["inputs"] == [{"name": "tokens", "shape": ["batch", "sequence"], "dtype": "int64"}]
    assert result["outputs"][0]["shape"] == ["batch", "sequence", 4]

    model = _torch_model(encoder_file)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for batch, length in ((1, 3), (4, 12)):
        tokens = rng.integers(0, 50, size=(batch, length)).astype(np.int64)
        with torch.inference_mode():
            expected = model(torch.from_numpy(tokens)).numpy()
        got = session.run(None, {"tokens": tokens})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_torchscript_bakes_the_sequence_length_and_is_marked_unverified(encoder_file, tmp_path, capsys):
    """The TorchScript exporter freezes the sequence length in the attention Reshapes; the second
    parity length catches it: exit 4, file kept, marked unverified in the model and beside it."""
    out = tmp_path / "encoder_ts.onnx"
    code, _ = _export(encoder_file, out, "--exporter", "torchscript")
    assert code == 4
    assert "UNVERIFIED" in capsys.readouterr().err
    assert out.exists()
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["onnxforge.verified"] == "false"
    note = json.loads((tmp_path / "encoder_ts.onnx.unverified.json").read_text())
    assert note["verified"] is False
    assert note["exporter"] == "torchscript"
    assert any("onnxruntime failed" in shapes for shapes in note["parity_inputs"])
