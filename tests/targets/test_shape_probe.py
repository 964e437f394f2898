"""shape_probe: dynamic dims get sizes the model really runs with, and profile says which."""

from __future__ import annotations

import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from onnxforge.errors import UsageError
from onnxforge.model_io import input_specs
from onnxforge.targets.profile import ProfileConfig, profile
from onnxforge.targets.shape_probe import probe_shapes


def _save(text: str, path) -> str:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return str(path)


def _probe(path: str):
    model = onnx.load(path)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refused sizes are expected
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return probe_shapes(session, input_specs(model), {}, model)


# height must be 32 (an Add against a [1, 3, 32, 1] constant: 224 fails to broadcast); width is free
_IMAGE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) {
    bias = Constant <value = float[1, 3, 32, 1] {VALUES}> ()
    y = Add(x, bias)
}
""".replace("VALUES", ", ".join(["0.5"] * 96))


def test_a_refused_guess_falls_back_to_the_largest_size_that_runs_and_keeps_the_free_dim(tmp_path):
    probed = _probe(_save(_IMAGE, tmp_path / "image.onnx"))
    assert probed.shapes == {"x": (1, 3, 32, 224)}  # the height that runs, the width left at its guess
    assert "Add" in probed.first_failure and "guessed sizes failed" in probed.describe()


def test_a_guess_that_runs_is_kept(tmp_path):
    path = _save("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, L] x) => (float[N, L] y) { y = Relu(x) }
    """, tmp_path / "free.onnx")
    probed = _probe(path)
    assert probed.shapes == {"x": (1, 128)} and probed.tries == 1 and "guessed" in probed.describe()


def test_dims_sharing_a_name_share_a_size(tmp_path):
    path = _save("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, L] a, float[N, L] b) => (float[N, L] y) {
        bias = Constant <value = float[1, 48] {VALUES}> ()
        s = Add(a, b)
        y = Add(s, bias)
    }
    """.replace("VALUES", ", ".join(["1.0"] * 48)), tmp_path / "shared.onnx")
    assert _probe(path).shapes == {"a": (1, 48), "b": (1, 48)}


def test_no_size_that_runs_is_a_usage_error(tmp_path):
    path = _save("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, L] x) => (float[N, 7] y) {
        shape = Constant <value = int64[2] {1, 7}> ()
        y = Reshape(x, shape)
    }
    """, tmp_path / "seven.onnx")
    with pytest.raises(UsageError, match="in Reshape node") as raised:
        _probe(path)
    assert "--input-shape" in (raised.value.hint or "")


def test_profile_runs_a_model_whose_guess_breaks_and_says_the_shape(tmp_path):
    path = _save(_IMAGE, tmp_path / "image.onnx")
    result = profile(path, ProfileConfig(min_seconds=0.0, min_runs=3, warmup=1))
    assert result.rows[0].latency.runs >= 3
    assert "x=1x3x32x224" in result.inputs and "guessed sizes failed" in result.inputs
    given = profile(path, ProfileConfig(min_seconds=0.0, min_runs=3, warmup=1, input_shapes={"x": (1, 3, 32, 8)}))
    assert "x=1x3x32x8" in given.inputs and "guessed" not in given.inputs  # --input-shape is never probed
