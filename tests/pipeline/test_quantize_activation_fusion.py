"""Hard-swish written out as Add, Clip, Mul, Div is fused into one HardSwish for the static candidates
(activation_fusion): the same function, checked against onnxruntime, and only for the exact constants."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import assert_numerically_equal, write_npz

from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize
from onnxforge.pipeline.quantize.activation_fusion import fuse_activations

pytestmark = pytest.mark.usefixtures("int8_faster")


def _conv_hardswish(clip_max: float = 6.0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 13]>
        net (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {{
            c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
            three = Constant <value = float {{3.0}}> ()
            lo = Constant <value = float {{0.0}}> ()
            hi = Constant <value = float {{{clip_max}}}> ()
            six = Constant <value = float {{6.0}}> ()
            s = Add (c, three)
            k = Clip (s, lo, hi)
            m = Mul (k, c)
            h = Div (m, six)
            y = Conv <pads = [1, 1, 1, 1]> (h, w2, b2)
        }}
    """)
    for name, shape in (("w1", (4, 4, 3, 3)), ("b1", (4,)), ("w2", (4, 4, 3, 3)), ("b2", (4,))):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32),
                                                                    name))
    onnx.checker.check_model(model)
    return model


def _feeds(n: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 2, (n, 4, 8, 8)).astype(np.float32)}


def test_the_four_ops_become_one_hardswish_with_the_same_outputs():
    model = _conv_hardswish()
    fusion = fuse_activations(model, [_feeds()])
    assert fusion.model is not None and fusion.fused == 1
    ops = [n.op_type for n in fusion.model.graph.node]
    assert ops.count("HardSwish") == 1 and not {"Clip", "Div", "Mul", "Add"} & set(ops)
    assert max(o.version for o in fusion.model.opset_import if o.domain in ("", "ai.onnx")) >= 14
    assert "1 hard-swish" in fusion.note and "outputs match" in fusion.note
    assert_numerically_equal(model, fusion.model, [_feeds(), _feeds(2, seed=3)])


def test_other_constants_or_no_clip_are_left_alone():
    assert fuse_activations(_conv_hardswish(clip_max=5.0), [_feeds()]).model is None  # not hard-swish
    relu = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        net (float[N, 4] x) => (float[N, 4] y) { y = Relu (x) }
    """)
    assert fuse_activations(relu, [{"x": np.ones((1, 4), np.float32)}]) == fuse_activations(relu, [])
    assert fuse_activations(relu, []).model is None


def test_static_candidates_quantize_the_fused_graph(tmp_path):
    path = tmp_path / "hs.onnx"
    onnx.save(_conv_hardswish(), str(path))
    calibration = write_npz(tmp_path / "calib.npz", x=_feeds(40)["x"])
    config = QuantizeConfig(schemes=(parse_scheme("qdq-u8s8-per-channel"),), tolerance=0.9, mixed_precision=False,
                            latency_rounds=3, error_report=False)
    result = quantize(path, tmp_path / "q.onnx", calibration, config)
    assert any("hard-swish" in n for n in result.notes)
    assert any("fp32 graph quantized from" in n or "rewritten fp32 graph" in n for n in result.notes)
    kept = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in kept.graph.node].count("HardSwish") == 1
