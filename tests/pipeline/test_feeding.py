"""Inputs as models declare them: a scalar fed unchanged with every batch, a state whose batch is on
axis 1, -1 dims; the npz convention that says so, honoured by every command that reads data.

The model mimics silero-vad: ``input`` [B, 8], ``state`` [2, B, 4], a scalar int64 ``sr`` that picks an
``If`` branch (16000: the real one; any other value: a branch that fails at run time, as a random sample
rate took silero-vad down the wrong branch).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import run_model, save
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import input_specs, load_model
from onnxforge.pipeline.calibration import load_samples, stream_folder
from onnxforge.pipeline.evaluate import run_outputs


def _vad_like(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.5).astype(np.float32), "w")
    v = numpy_helper.from_array((rng.standard_normal((4, 1)) * 0.5).astype(np.float32), "v")
    good = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["branch"])], "good", [],
        [helper.make_tensor_value_info("branch", TensorProto.FLOAT, None)],
    )
    bad_shape = numpy_helper.from_array(np.array([7, 7, 7], np.int64), "bad_shape")
    bad = helper.make_graph(
        [helper.make_node("Reshape", ["h", "bad_shape"], ["branch_bad"])], "bad", [],
        [helper.make_tensor_value_info("branch_bad", TensorProto.FLOAT, None)], [bad_shape],
    )
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h0"]),
        helper.make_node("ReduceMean", ["state", "zero"], ["s"], keepdims=0),  # [B, 4]
        helper.make_node("Add", ["h0", "s"], ["h"]),
        helper.make_node("Equal", ["sr", "rate"], ["ok"]),
        helper.make_node("If", ["ok"], ["hb"], then_branch=good, else_branch=bad),
        helper.make_node("Tanh", ["hb"], ["t"]),
        helper.make_node("MatMul", ["t", "v"], ["o"]),
        helper.make_node("Sigmoid", ["o"], ["output"]),
        helper.make_node("Unsqueeze", ["t", "zero"], ["t1"]),
        helper.make_node("Concat", ["t1", "t1"], ["stateN"], axis=0),  # [2, B, 4]
    ]
    graph = helper.make_graph(
        nodes, "vad_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "B", 4])],
        [w, v, numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.array(16000, np.int64), "rate")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)).astype(np.float32), (rng.standard_normal((n, 2, 4)) * 0.1).astype(np.float32)


@pytest.fixture
def vad_path(tmp_path):
    return save(_vad_like(), tmp_path / "vad_like.onnx")


@pytest.fixture
def vad_data(tmp_path):
    x, state = _samples(40)
    return {"input": x, "state": state}


@pytest.mark.parametrize("sr_key, sr_value", [("sr@const", np.array(16000)), ("sr", np.array(16000)),
                                              ("sr", np.full(40, 16000))])
def test_a_scalar_is_a_constant_and_a_state_takes_its_batch_on_axis_1(tmp_path, vad_path, vad_data, sr_key, sr_value):
    path = tmp_path / "data.npz"
    np.savez(path, **vad_data, **{sr_key: sr_value})
    model = load_model(vad_path)
    samples = load_samples(path, input_specs(model))
    assert dict(samples.feeding.batch_axes) == {"state": 1}
    assert samples.feeding.constants["sr"].shape == () and samples.feeding.constants["sr"] == 16000
    feeds = next(samples.batches(16))
    assert feeds["input"].shape == (16, 8) and feeds["state"].shape == (2, 16, 4) and feeds["sr"].shape == ()
    # every sample's output equals running it alone; stateN comes back with samples first
    outputs = run_outputs(__import__("onnxruntime").InferenceSession(str(vad_path)), samples, 16)
    alone = run_model(vad_path, {"input": vad_data["input"][3:4], "state": vad_data["state"][3][:, None],
                                 "sr": np.array(16000)})
    np.testing.assert_allclose(outputs[0][3], alone[0][0], rtol=1e-5)
    assert outputs[1].shape == (40, 2, 4)


def test_an_explicit_batch_axis_and_bad_constants_are_checked(tmp_path, vad_path, vad_data):
    specs = input_specs(load_model(vad_path))
    np.savez(tmp_path / "explicit.npz", input=vad_data["input"], **{"state@1": vad_data["state"], "sr@const": 16000})
    assert dict(load_samples(tmp_path / "explicit.npz", specs).feeding.batch_axes) == {"state": 1}
    np.savez(tmp_path / "mixed.npz", **vad_data, sr=np.arange(40))  # one sample rate per sample: no single value
    with pytest.raises(CalibrationDataError, match="rank 1") as info:
        load_samples(tmp_path / "mixed.npz", specs)
    assert "sr@const" in info.value.hint
    np.savez(tmp_path / "wrong.npz", **vad_data, **{"sr@const": np.array([16000, 8000])})
    with pytest.raises(CalibrationDataError, match="constant of shape 2"):
        load_samples(tmp_path / "wrong.npz", specs)
    np.savez(tmp_path / "typo.npz", **vad_data, **{"sr@const": 16000, "rate@const": 1})
    with pytest.raises(CalibrationDataError, match="names no model input"):
        load_samples(tmp_path / "typo.npz", specs)


def test_a_folder_streams_with_the_same_feeding(tmp_path, vad_path, vad_data):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(4):
        part = slice(10 * i, 10 * (i + 1))
        np.savez(folder / f"{i}.npz", input=vad_data["input"][part], state=vad_data["state"][part],
                 **{"sr@const": 16000})
    stream = stream_folder(folder, input_specs(load_model(vad_path)))
    assert len(stream) == 40 and dict(stream.feeding.batch_axes) == {"state": 1}
    shapes = [tuple(b["state"].shape) for b in stream.batches(16)]
    assert sorted(shapes) == [(2, 8, 4), (2, 16, 4), (2, 16, 4)]
    np.savez(folder / "9.npz", input=vad_data["input"][:5], state=vad_data["state"][:5], **{"sr@const": 8000})
    with pytest.raises(CalibrationDataError, match="constants"):
        list(stream_folder(folder, input_specs(load_model(vad_path))).batches(16))


def test_simplify_profile_and_quantize_honour_the_data(tmp_path, cli, vad_path, vad_data, int8_faster):
    data = tmp_path / "data.npz"
    np.savez(data, **vad_data, **{"sr@const": 16000})
    code, _, err = cli("simplify", vad_path, "-o", tmp_path / "s.onnx", "--data", data)
    assert code == 0, err
    code, _out, err = cli("profile", vad_path, "--data", data, "--min-seconds", "0.05", "--json", "-")
    assert code == 0, err
    code, _, err = cli("quantize", vad_path, "-o", tmp_path / "q.onnx", "--calibration", data,
                       "--tolerance", "0.9", "--scheme", "dynamic-s8-per-channel", "--json", tmp_path / "q.json")
    assert code == 0, err
    assert json.loads((tmp_path / "q.json").read_text())["candidates"][0]["score"] > 0.9


def test_minus_one_dims_are_dynamic(tmp_path):
    from conftest import make_classifier

    model = make_classifier()
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = -1  # paddle2onnx's way of saying "dynamic"
    path = tmp_path / "minus_one.onnx"
    path.write_bytes(model.SerializeToString())
    specs = input_specs(load_model(path))
    assert specs[0].shape == (None, 3, 8, 8) and specs[0].shape_text() == "?x3x8x8"
