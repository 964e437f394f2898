"""fp16 conversion: a smaller, valid model within fp16 tolerance, and a recipe stage."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxforge.errors import QualityGateError
from onnxforge.model_io import load_model
from onnxforge.parity import Tolerance
from onnxforge.pipeline.fp16 import Fp16Config, convert_fp16


def _mlp(path, scale: float = 1.0):
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 256)) / 8.0 * scale).astype(np.float32)
    w2 = (rng.standard_normal((256, 4)) / 16.0).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_fp16_halves_weights_keeps_fp32_io_and_parity(tmp_path):
    src = _mlp(tmp_path / "m.onnx")
    result = convert_fp16(src, tmp_path / "m16.onnx")
    assert result.parity.ok
    assert result.bytes_after < 0.6 * result.bytes_before
    model = load_model(result.path)  # passes the checker: nodes topologically sorted
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert set(weights.values()) == {onnx.TensorProto.FLOAT16}


def test_fp16_drift_beyond_tolerance_keeps_file_and_exits_4(tmp_path):
    src = _mlp(tmp_path / "m.onnx", scale=300.0)  # large activations: fp16 rounding error is large in absolute terms
    out = tmp_path / "m16.onnx"
    with pytest.raises(QualityGateError) as info:
        convert_fp16(src, out, Fp16Config(tolerance=Tolerance(atol=1e-6, rtol=1e-6)))
    assert info.value.exit_code == 4
    assert out.exists()


def _sequence_model(path):
    """[batch, sequence, 8] @ [8, 8]: a dynamic non-batch dim, as in every transformer."""
    w = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32) / 4
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "seq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "sequence", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "sequence", 8])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_fp16_parity_runs_on_the_data_given_and_states_a_guess_without_it(tmp_path):
    # a dynamic sequence dim made fp16 exit 2 unless --input-shape named it
    src = _sequence_model(tmp_path / "s.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(2).standard_normal((3, 5, 8)).astype(np.float32))
    with_data = convert_fp16(src, tmp_path / "a.onnx", Fp16Config(sample_data=data))
    assert with_data.parity.ok and with_data.parity_inputs == f"2 sample(s) of {data}"
    assert with_data.to_json()["parity_inputs"] == with_data.parity_inputs
    guessed = convert_fp16(src, tmp_path / "b.onnx")
    assert guessed.parity.ok and "dynamic dims guessed" in guessed.parity_inputs


def test_fp16_drift_on_random_inputs_points_at_real_data(tmp_path):
    src = _mlp(tmp_path / "m.onnx", scale=300.0)
    with pytest.raises(QualityGateError) as info:
        convert_fp16(src, tmp_path / "m16.onnx", Fp16Config(tolerance=Tolerance(atol=1e-6, rtol=1e-6)))
    assert "random N(0,1)" in info.value.message and "--data" in info.value.hint


def test_an_fp16_model_is_refused_not_converted_again(tmp_path):
    """Found by fuzzing recipes (two fp16 stages): converted twice, onnxruntime's converter declared its
    input Cast twice and onnx-ir's loader raised, an internal error (exit 1)."""
    from onnxforge.errors import InvalidModelError

    half = convert_fp16(_mlp(tmp_path / "mlp.onnx"), tmp_path / "half.onnx").path
    with pytest.raises(InvalidModelError, match="already fp16") as info:
        convert_fp16(half, tmp_path / "quarter.onnx")
    assert info.value.exit_code == 2 and not (tmp_path / "quarter.onnx").exists()
