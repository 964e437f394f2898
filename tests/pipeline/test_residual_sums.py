"""Residual sums kept out of SkipLayerNormalization: same outputs, and onnxruntime no longer fuses them."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from conftest import assert_numerically_equal, write_npz
from transformer_graphs import encoder_feeds, make_encoder

from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize, skip_layer_norm
from onnxforge.pipeline.quantize.skip_layer_norm import residual_sums, skip_layer_norm_slowdown
from onnxforge.pipeline.quantize.transformer_fusion import fuse_transformer
from onnxforge.targets import CpuTarget


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
    slowdown = skip_layer_norm_slowdown(CpuTarget())
    assert slowdown is not None and slowdown > 0


@pytest.mark.parametrize("slowdown", [1.0, 5.0])
def test_quantize_rewrites_only_where_the_target_measured_it_slower(slowdown, tmp_path, monkeypatch, int8_faster):
    monkeypatch.setattr(skip_layer_norm, "skip_layer_norm_slowdown", lambda target: slowdown)
    model, out = tmp_path / "encoder.onnx", tmp_path / "int8.onnx"
    onnx.save_model(make_encoder(layers=2), str(model))
    feeds = encoder_feeds(16, 6)
    calib = write_npz(tmp_path / "calib.npz", **feeds)
    result = quantize(model, out, calib, QuantizeConfig(
        schemes=(parse_scheme("qdq-u8s8-per-channel-matmul"),), metric=Metric.COSINE, tolerance=0.5,
        latency_rounds=1, mixed_precision=False, error_report=False))

    sums = sum(n.op_type == "Sum" for n in onnx.load(str(out)).graph.node)
    noted = any("residual Add(s) written as Sum" in n for n in result.notes)
    assert (sums, noted) == ((4, True) if slowdown > 1.2 else (0, False))
