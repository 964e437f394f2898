"""Residual sums kept out of SkipLayerNormalization: same outputs, and onnxruntime no longer fuses them."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from conftest import assert_numerically_equal
from onnxforge.pipeline.quantize.skip_layer_norm import residual_sums, should_keep_unfused
from onnxforge.pipeline.quantize.transformer_fusion import fuse_transformer
from onnxforge.targets import CpuTarget
from transformer_graphs import encoder_feeds, make_encoder


def _ort_ops(model: onnx.ModelProto, tmp_path) -> set[str]:
    """The op types onnxruntime runs for ``model`` on the CPU after its own graph optimizations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


def test_add_before_layer_norm_becomes_sum_and_onnxruntime_stops_fusing_it(tmp_path):
    model = onnx.shape_inference.infer_shapes(make_encoder(layers=2))  # onnxruntime fuses only with shapes known
    assert "SkipLayerNormalization" in _ort_ops(model, tmp_path)  # what onnxruntime does with Add + LayerNorm

    rewritten, count = residual_sums(model)
    assert count == 4
    assert "SkipLayerNormalization" not in _ort_ops(rewritten, tmp_path)
    assert_numerically_equal(model, rewritten, [encoder_feeds(), encoder_feeds(3, 4, seed=2)], atol=1e-5)


def test_fused_skip_layer_norms_are_written_back_with_the_same_outputs():
    model = make_encoder(layers=2)
    fused = fuse_transformer(model, [encoder_feeds()]).model
    rewritten, count = residual_sums(fused)

    ops = [n.op_type for n in rewritten.graph.node]
    assert count == 4 and "SkipLayerNormalization" not in ops and ops.count("Sum") == 4
    assert "Attention" in ops  # the other fusions stay
    assert_numerically_equal(model, rewritten, encoder_feeds(2, 5, seed=3), atol=1e-4)


def test_the_slowdown_is_measured_on_the_target():
    keep, slowdown = should_keep_unfused(CpuTarget())
    assert slowdown is not None and slowdown > 0
    assert keep == (slowdown >= 1.2)
