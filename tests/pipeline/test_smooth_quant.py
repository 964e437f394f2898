"""SmoothQuant scale migration: same outputs in fp32, less int8 error where activations have outlier channels."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_numerically_equal, run_model
from onnx_graphs import model_from_text
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformer_graphs import encoder_feeds, make_encoder

from onnxforge.pipeline.compare import ErrorAccumulator
from onnxforge.pipeline.quantize.smooth_quant import smooth_groups, smooth_model


def _batches(count: int = 6):
    return [encoder_feeds(2, 8, seed=s) for s in range(count)]


def test_groups_are_the_matmuls_reading_a_normalization():
    groups = smooth_groups(make_encoder(layers=2))
    # the first layer reads the input (no normalization); then QKV and FFN1 read each LayerNorm
    assert sorted(groups) == ["n0", "n1", "y0"]
    assert len(groups["y0"]) == 3 and len(groups["n0"]) == 1


def test_smoothing_keeps_outputs_and_cuts_int8_error_on_outlier_channels(tmp_path):
    model = make_encoder(layers=2, outlier=30.0)
    result = smooth_model(model, _batches(), alpha=0.5)
    assert result.groups == 3 and result.folded == 0  # post-LN: the normalized output is also the residual
    assert sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in result.model.graph.node) == 3
    assert_numerically_equal(model, result.model, encoder_feeds(3, 5, seed=9), atol=1e-4)

    errors = {}
    for name, fp32 in (("plain", model), ("smoothed", result.model)):
        src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}_int8.onnx"
        onnx.save_model(fp32, str(src))
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
        )
        acc = ErrorAccumulator()
        for feeds in _batches(4):
            acc.add(run_model(model, feeds)[0], run_model(dst, feeds)[0])
        errors[name] = acc.sqnr_db()
    assert errors["smoothed"] > errors["plain"] + 3.0, errors


def test_a_pre_norm_block_gets_the_scales_folded_into_gamma_and_beta():
    rng = np.random.default_rng(0)
    model = model_from_text(
        """
        n = LayerNormalization <axis = -1> (x, gamma, beta)
        q = MatMul (n, wq)
        k = MatMul (n, wk)
        y = Add (q, k)
        """,
        {
            "gamma": (1 + rng.standard_normal(8)).astype(np.float32),
            "beta": rng.standard_normal(8).astype(np.float32),
            "wq": rng.standard_normal((8, 8)).astype(np.float32),
            "wk": rng.standard_normal((8, 8)).astype(np.float32),
        },
        "float[N,8] x",
        "float[N,8] y",
    )
    batches = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(3)]
    result = smooth_model(model, batches)

    assert (result.groups, result.folded) == (1, 1)
    assert "Mul" not in {n.op_type for n in result.model.graph.node}
    assert_numerically_equal(model, result.model, batches, atol=1e-4)
