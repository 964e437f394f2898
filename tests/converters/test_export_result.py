"""What an export reports and leaves behind: input names/shapes/dtypes of a multi-input model,
parity on the user's sample .npz, the unverified note, external data on the dynamo path."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import onnxforge.model_io
from onnxforge.cli import main
from onnxforge.converters import ExportConfig, export, torch_export, unverified_note_path
from onnxforge.errors import QualityGateError
from onnxforge.parity import Tolerance

TWO_IO_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class TwoInTwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(300, 8)  # > 1 KB: save_model externalizes tensors of 1 KB and up
            self.proj = nn.Linear(5, 8)
            self.cls = nn.Linear(8, 3)

        def forward(self, features, token_ids):
            h = self.proj(features) + self.embed(token_ids).mean(dim=1)
            return self.cls(h), h.norm(dim=-1)

    def build():
        torch.manual_seed(0)
        return TwoInTwoOut().eval(), {"features": torch.randn(2, 5), "token_ids": torch.randint(0, 30, (2, 6))}
    """
)


@pytest.fixture
def two_io_file(tmp_path):
    path = tmp_path / "two_io.py"
    path.write_text(TWO_IO_SOURCE)
    return path


def test_multi_input_names_shapes_dtypes(two_io_file, tmp_path):
    out = tmp_path / "two_io.onnx"
    result = export(f"{two_io_file}:build", out, ExportConfig(dynamic_batch=True))
    assert result.verified
    assert [(s.name, s.shape, str(s.dtype)) for s in result.inputs] == [
        ("features", ("batch", 5), "float32"),
        ("token_ids", ("batch", 6), "int64"),
    ]
    assert [(s.name, s.shape) for s in result.outputs] == [("output_0", ("batch", 3)), ("output_1", ("batch",))]
    assert {o.name for o in result.parity.outputs} == {"output_0", "output_1"}
    assert result.parity.batch_sizes == (1, 3)


def test_parity_on_the_users_sample(two_io_file, tmp_path):
    rng = np.random.default_rng(0)
    sample = tmp_path / "sample.npz"
    np.savez(sample, features=rng.standard_normal((4, 5)).astype(np.float32),
             token_ids=rng.integers(0, 30, (4, 6)))
    out = tmp_path / "two_io.onnx"
    report = tmp_path / "r.json"
    code = main(["export", f"{two_io_file}:build", "-o", str(out), "--dynamic-batch",
                 "--sample", str(sample), "--json", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["parity_inputs"] == ["features 1x5, token_ids 1x6", "features 3x5, token_ids 3x6"]
    assert all(o["max_abs_error"] < 1e-4 for o in result["parity"]["outputs"])


def test_sample_missing_an_input(two_io_file, tmp_path, capsys):
    sample = tmp_path / "sample.npz"
    np.savez(sample, features=np.zeros((2, 5), np.float32))
    out = tmp_path / "two_io.onnx"
    assert main(["export", f"{two_io_file}:build", "-o", str(out), "--sample", str(sample)]) == 2
    assert "no array for model input 'token_ids'" in capsys.readouterr().err
    assert not out.exists()


def test_failed_parity_leaves_a_note_and_a_verified_export_removes_it(two_io_file, tmp_path):
    out = tmp_path / "two_io.onnx"
    impossible = ExportConfig(tolerance=Tolerance(atol=0.0, rtol=0.0), exporter=torch_export.Exporter.TORCHSCRIPT)
    with pytest.raises(QualityGateError) as failure:
        export(f"{two_io_file}:build", out, impossible)
    assert failure.value.exit_code == 4 and failure.value.best_path == str(out)
    note = unverified_note_path(out)
    assert out.exists() and note.exists()
    assert json.loads(note.read_text())["verified"] is False
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["onnxforge.verified"] == "false"

    result = export(f"{two_io_file}:build", out, ExportConfig())
    assert result.verified
    assert not note.exists()
    assert "onnxforge.verified" not in {p.key for p in onnx.load(str(out)).metadata_props}


def test_dynamo_external_data_past_the_threshold(two_io_file, tmp_path, monkeypatch):
    """Models past 2 GB must use external data on purpose: lower the thresholds so a tiny model
    takes that path, with the checker and parity run from the saved files."""
    calls = []
    real_export = torch.onnx.export

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    monkeypatch.setattr(torch_export, "_EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(onnxforge.model_io, "_EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(onnxforge.model_io, "_PROTOBUF_LIMIT", 1)  # "does not fit": the >2 GB code path
    out = tmp_path / "big" / "two_io.onnx"
    # in_process: the patches above live in this process, not in the child a .py source runs in
    result = export(f"{two_io_file}:build", out, ExportConfig(dynamic_batch=True), in_process=True)
    assert result.exporter == "dynamo" and result.verified
    assert calls[0]["dynamo"] is True and calls[0]["external_data"] is True
    data = out.with_name("two_io.onnx.data")
    assert data.exists() and data.stat().st_size > 0
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"features": np.ones((2, 5), np.float32), "token_ids": np.arange(12, dtype=np.int64).reshape(2, 6) % 30}
    assert session.run(None, feeds)[0].shape == (2, 3)
