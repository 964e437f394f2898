"""An .onnx SOURCE: external data read from beside the file, the full checker, a missing data file."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import onnxruntime as ort
import pytest

from onnxforge.cli import main


def _model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(textwrap.dedent(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[N,64] x) => (float[N,32] y) {
            h = MatMul (x, w)
            y = Relu (h)
        }
        """
    ))
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    return model


@pytest.fixture
def external_model(tmp_path):
    folder = tmp_path / "model_dir"
    folder.mkdir()
    path = folder / "mlp.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=True, location="mlp.weights", size_threshold=0)
    assert (folder / "mlp.weights").exists()
    return path


def test_external_data_beside_the_file(external_model, tmp_path):
    out = tmp_path / "out" / "mlp.onnx"
    report = tmp_path / "r.json"
    assert main(["export", str(external_model), "-o", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["source_kind"] == "onnx"
    assert result["inputs"] == [{"name": "x", "shape": ["N", 64], "dtype": "float32"}]
    assert any("external data" in n for n in result["notes"])
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    want = ort.InferenceSession(str(external_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    # shape inference ran: the intermediate has a typed value_info in the output
    assert "h" in {v.name for v in onnx.load(str(out)).graph.value_info}


def test_missing_external_data_file(external_model, tmp_path, capsys):
    (external_model.parent / "mlp.weights").unlink()
    out = tmp_path / "mlp.onnx"
    assert main(["export", str(external_model), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'mlp.weights' is missing" in err
    assert not out.exists()


def test_full_check_rejects_a_shape_conflict(tmp_path, capsys):
    """Passes the plain checker, fails strict shape inference: a [2,3] + [4,5] Add."""
    model = onnx.parser.parse_model(textwrap.dedent(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        bad (float[2,3] a, float[4,5] b) => (float[2,3] c) {
            c = Add (a, b)
        }
        """
    ))
    onnx.checker.check_model(model, full_check=False)
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(path))
    out = tmp_path / "out.onnx"
    assert main(["export", str(path), "-o", str(out)]) == 2
    assert "fails the full ONNX check" in capsys.readouterr().err
    assert not out.exists()
