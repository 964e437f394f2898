"""torch.export programs (.pt2): exported with the dynamo exporter, their own dynamic dims kept."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxforge.cli import main


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.GELU())
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 1)

    def forward(self, x, scale):
        h = self.body(x) * scale
        return self.a(h), self.b(h).sigmoid()


@pytest.fixture
def program(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    batch = torch.export.Dim("batch")
    exported = torch.export.export(
        model, (torch.randn(2, 6), torch.rand(2, 1)), dynamic_shapes=({0: batch}, {0: batch})
    )
    path = tmp_path / "two_heads.pt2"
    torch.export.save(exported, str(path))
    return path, model


def test_pt2_exports_with_parity_and_dynamic_batch(program, tmp_path):
    path, model = program
    out = tmp_path / "two_heads.onnx"
    report = tmp_path / "r.json"
    assert main(["export", str(path), "-o", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["source_kind"] == "torch.export"
    assert result["exporter"] == "dynamo"
    assert result["verified"] is True
    assert result["parity"]["batch_sizes"] == [1, 3]
    assert [i["name"] for i in result["inputs"]] == ["x", "scale"]
    assert [o["name"] for o in result["outputs"]] == ["output_0", "output_1"]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    scale = np.random.default_rng(1).random((5, 1)).astype(np.float32)
    with torch.inference_mode():
        expected = [t.numpy() for t in model(torch.from_numpy(x), torch.from_numpy(scale))]
    for got, want in zip(session.run(None, {"x": x, "scale": scale}), expected, strict=False):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_pt2_refuses_new_dynamic_dims(program, tmp_path, capsys):
    path, _ = program
    out = tmp_path / "x.onnx"
    assert main(["export", str(path), "-o", str(out), "--dynamic-batch"]) == 2
    assert "fixed its dynamic dims" in capsys.readouterr().err
    assert not out.exists()


def test_a_file_that_is_not_a_program(tmp_path, capsys):
    path = tmp_path / "bad.pt2"
    path.write_bytes(b"not a zip archive")
    out = tmp_path / "x.onnx"
    assert main(["export", str(path), "-o", str(out)]) == 2
    assert "not a torch.export program" in capsys.readouterr().err
    assert not out.exists()
