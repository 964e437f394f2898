"""Structured channel pruning on tiny graphs built inline.

Exactness: the channels to remove are made zero by construction (producer weights and bias, and the
consumer's input weights), so they are the least important ones and removing them must not change
the output at all; every pruned model must also pass the checker, run, and have smaller weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest
from conftest import assert_numerically_equal, run_model, save
from onnx_graphs import model_from_text

from onnxforge.errors import CalibrationDataError, QualityGateError, UsageError
from onnxforge.model_cost import count_params_and_macs
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.prune.channels import (
    Allocation,
    ChannelPruneConfig,
    Importance,
    Repair,
    prune_channels,
    prune_model,
    sensitivity_ratios,
)
from onnxforge.pipeline.prune.repair import repair_model

IMAGE = "float[N,3,8,8] x"


def _model(
    body: str, weights: dict[str, np.ndarray], inputs: str = IMAGE, outputs: str = "float[N,4,8,8] y"
) -> onnx.ModelProto:
    return model_from_text(body, weights, inputs, outputs)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _conv(rng, cout: int, cin: int, k: int = 3) -> np.ndarray:
    return (rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32)


def _bias(rng, n: int) -> np.ndarray:
    return (rng.standard_normal(n) * 0.1).astype(np.float32)


def _images(n: int, seed: int) -> np.ndarray:
    return _rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def _initializer(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> np.ndarray:
    inits = {t.name: t for t in model.graph.initializer}
    return onnx.numpy_helper.to_array(inits[node.input[index]])


def _prune(model: onnx.ModelProto, ratio: float = 0.5, **kwargs):
    # round_to 1: these graphs prune 8 channels to 4 to check the rewrite; rounding is test_prune_speed.py's
    pruned = prune_model(model, ChannelPruneConfig(ratio=ratio, repair=Repair.NONE, round_to=1, **kwargs))
    onnx.checker.check_model(pruned.model, full_check=True)
    return pruned


def _feeds(seed: int = 7) -> list[dict[str, np.ndarray]]:
    return [{"x": _images(1, seed)}, {"x": _images(5, seed + 1)}]


# ------------------------------------------------------------------------------------------------
# Structures


def test_conv_chain_removes_zero_channels_exactly():
    rng = _rng(0)
    w1, b1, w2, b2, w3, b3 = (
        _conv(rng, 8, 3),
        _bias(rng, 8),
        _conv(rng, 8, 8),
        _bias(rng, 8),
        _conv(rng, 4, 8),
        _bias(rng, 4),
    )
    dead1, dead2 = [1, 3, 5, 7], [0, 2, 4, 6]
    w1[dead1], b1[dead1], w2[:, dead1] = 0, 0, 0
    w2[dead2], b2[dead2], w3[:, dead2] = 0, 0, 0
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (ra, w2, b2)
        rb = Relu (b)
        y = Conv <pads = [1, 1, 1, 1]> (rb, w3, b3)
        """,
        dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3),
    )
    pruned = _prune(model)
    weights = [onnx.numpy_helper.to_array(t) for t in pruned.model.graph.initializer if t.dims and len(t.dims) == 4]
    assert sorted(w.shape for w in weights) == [(4, 3, 3, 3), (4, 4, 3, 3), (4, 4, 3, 3)]
    assert_numerically_equal(model, pruned.model, _feeds())
    # the last Conv produces the graph output: listed as skipped, never pruned
    skipped = pruned.skipped_layers
    assert any("graph output" in reason for reason in skipped.values())
    params0, macs0 = count_params_and_macs(model)
    params1, macs1 = count_params_and_macs(pruned.model)
    assert params1 < params0 and macs1 < macs0


def test_residual_add_prunes_both_branches_together():
    rng = _rng(1)
    wa, ba, wb, bb, wc = _conv(rng, 8, 3), _bias(rng, 8), _conv(rng, 8, 8), _bias(rng, 8), _conv(rng, 4, 8, 1)
    dead = [0, 3, 4, 6]
    wa[dead], ba[dead], wb[dead], bb[dead], wb[:, dead], wc[:, dead] = 0, 0, 0, 0, 0, 0
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (ra, wb, bb)
        s = Add (ra, b)
        rs = Relu (s)
        y = Conv (rs, wc)
        """,
        dict(wa=wa, ba=ba, wb=wb, bb=bb, wc=wc),
    )
    pruned = _prune(model)
    prunable = [g for g in pruned.groups if g["prunable"]]
    assert len(prunable) == 1 and prunable[0]["channels"] == 8
    assert len(prunable[0]["producers"]) == 2  # both sides of the Add
    inits = {t.name: tuple(t.dims) for t in pruned.model.graph.initializer}
    conv_shapes = [inits[n.input[1]] for n in pruned.model.graph.node if n.op_type == "Conv"]
    assert conv_shapes == [(4, 3, 3, 3), (4, 4, 3, 3), (4, 4, 1, 1)]
    assert_numerically_equal(model, pruned.model, _feeds())


def test_concat_keeps_offsets_of_each_input():
    rng = _rng(2)
    w1, b1, w2, b2, w3 = _conv(rng, 4, 3, 1), _bias(rng, 4), _conv(rng, 6, 3, 1), _bias(rng, 6), _conv(rng, 4, 10, 1)
    w1[[0, 1]], b1[[0, 1]] = 0, 0
    w2[[3, 4, 5]], b2[[3, 4, 5]] = 0, 0
    w3[:, [0, 1, 7, 8, 9]] = 0
    model = _model(
        """
        a = Conv (x, w1, b1)
        ra = Relu (a)
        b = Conv (x, w2, b2)
        rb = Relu (b)
        c = Concat <axis = 1> (ra, rb)
        y = Conv (c, w3)
        """,
        dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3),
    )
    pruned = _prune(model)
    inits = {t.name: tuple(t.dims) for t in pruned.model.graph.initializer}
    conv_shapes = [inits[n.input[1]] for n in pruned.model.graph.node if n.op_type == "Conv"]
    assert conv_shapes == [(2, 3, 1, 1), (3, 3, 1, 1), (4, 5, 1, 1)]
    assert_numerically_equal(model, pruned.model, _feeds())


def test_depthwise_conv_follows_its_input_and_rewrites_group():
    rng = _rng(3)
    w1, b1, wd, bd, w2 = _conv(rng, 8, 3), _bias(rng, 8), _conv(rng, 8, 1), _bias(rng, 8), _conv(rng, 4, 8, 1)
    dead = [1, 2, 5, 6]
    w1[dead], b1[dead], wd[dead], bd[dead], w2[:, dead] = 0, 0, 0, 0, 0
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        d = Conv <pads = [1, 1, 1, 1], group = 8> (ra, wd, bd)
        rd = Relu (d)
        y = Conv (rd, w2)
        """,
        dict(w1=w1, b1=b1, wd=wd, bd=bd, w2=w2),
    )
    pruned = _prune(model)
    depthwise = [
        n
        for n in pruned.model.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert len(depthwise) == 1
    assert next(a.i for a in depthwise[0].attribute if a.name == "group") == 4
    inits = {t.name: tuple(t.dims) for t in pruned.model.graph.initializer}
    assert inits[depthwise[0].input[1]] == (4, 1, 3, 3)
    assert_numerically_equal(model, pruned.model, _feeds())


def test_flatten_into_gemm_slices_feature_blocks():
    rng = _rng(4)
    w1, b1 = _conv(rng, 4, 3), _bias(rng, 4)
    fc = (rng.standard_normal((5, 4 * 64)) * 0.1).astype(np.float32)
    fb = _bias(rng, 5)
    w1[[1, 2]], b1[[1, 2]] = 0, 0
    fc[:, 64:192] = 0
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        f = Flatten <axis = 1> (ra)
        y = Gemm <transB = 1> (f, fc, fb)
        """,
        dict(w1=w1, b1=b1, fc=fc, fb=fb),
        outputs="float[N,5] y",
    )
    pruned = _prune(model)
    gemm = next(n for n in pruned.model.graph.node if n.op_type == "Gemm")
    assert _initializer(pruned.model, gemm, 1).shape == (5, 128)
    assert_numerically_equal(model, pruned.model, _feeds())


def test_reduce_mean_reshape_gemm_head_rewrites_shape_literal():
    rng = _rng(5)
    w1, b1 = _conv(rng, 8, 3), _bias(rng, 8)
    fc, fb = (rng.standard_normal((5, 8)) * 0.3).astype(np.float32), _bias(rng, 5)
    dead = [0, 1, 2, 7]
    w1[dead], b1[dead], fc[:, dead] = 0, 0, 0
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        m = ReduceMean <keepdims = 1> (ra, axes)
        v = Reshape (m, shape)
        y = Gemm <transB = 1> (v, fc, fb)
        """,
        dict(w1=w1, b1=b1, fc=fc, fb=fb, axes=np.array([2, 3], np.int64), shape=np.array([-1, 8], np.int64)),
        outputs="float[N,5] y",
    )
    pruned = _prune(model)
    reshape = next(n for n in pruned.model.graph.node if n.op_type == "Reshape")
    assert _initializer(pruned.model, reshape, 1).tolist() == [-1, 4]
    gemm = next(n for n in pruned.model.graph.node if n.op_type == "Gemm")
    assert _initializer(pruned.model, gemm, 1).shape == (5, 4)
    assert_numerically_equal(model, pruned.model, _feeds())


def test_matmul_chain_with_bias_add():
    rng = _rng(6)
    w1 = (rng.standard_normal((16, 32)) * 0.3).astype(np.float32)
    b1 = _bias(rng, 32)
    w2 = (rng.standard_normal((32, 8)) * 0.3).astype(np.float32)
    dead = list(range(0, 32, 2))
    w1[:, dead], b1[dead], w2[dead] = 0, 0, 0
    model = _model(
        """
        h = MatMul (x, w1)
        hb = Add (h, b1)
        r = Relu (hb)
        y = MatMul (r, w2)
        """,
        dict(w1=w1, b1=b1, w2=w2),
        inputs="float[N,16] x",
        outputs="float[N,8] y",
    )
    pruned = _prune(model)
    inits = {t.name: tuple(t.dims) for t in pruned.model.graph.initializer}
    assert sorted(inits.values()) == [(16,), (16, 8), (16, 16)]
    feeds = [{"x": _rng(9).standard_normal((n, 16)).astype(np.float32)} for n in (1, 4)]
    assert_numerically_equal(model, pruned.model, feeds)


def test_grouped_conv_prunes_the_same_count_in_every_group():
    rng = _rng(7)
    w1, b1, wm, wg, bg, w2 = (
        _conv(rng, 8, 3),
        _bias(rng, 8),
        _conv(rng, 8, 8),
        _conv(rng, 8, 4),
        _bias(rng, 8),
        _conv(rng, 4, 8, 1),
    )
    # group=2: input channels 0-3 feed outputs 0-3, input channels 4-7 feed outputs 4-7
    dead_a, dead_in, dead_out = [0, 2, 4, 6], [1, 2, 5, 7], [0, 3, 4, 5]  # two in each block
    w1[dead_a], b1[dead_a], wm[:, dead_a] = 0, 0, 0
    wm[dead_in], wg[:4, [1, 2]], wg[4:, [1, 3]] = 0, 0, 0
    wg[dead_out], bg[dead_out], w2[:, dead_out] = 0, 0, 0
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        m = Conv <pads = [1, 1, 1, 1]> (ra, wm)
        rm = Relu (m)
        g = Conv <pads = [1, 1, 1, 1], group = 2> (rm, wg, bg)
        rg = Relu (g)
        y = Conv (rg, w2)
        """,
        dict(w1=w1, b1=b1, wm=wm, wg=wg, bg=bg, w2=w2),
    )
    pruned = _prune(model)
    grouped = [g for g in pruned.groups if g["blocks"] == 2]
    assert len(grouped) == 2 and all(g["prunable"] for g in grouped)
    inits = {t.name: tuple(t.dims) for t in pruned.model.graph.initializer}
    conv_shapes = [inits[n.input[1]] for n in pruned.model.graph.node if n.op_type == "Conv"]
    assert conv_shapes == [(4, 3, 3, 3), (4, 4, 3, 3), (4, 2, 3, 3), (4, 4, 1, 1)]
    node = next(n for n in pruned.model.graph.node if n.op_type == "Conv" and n.input[0] == "rm")
    assert next(a.i for a in node.attribute if a.name == "group") == 2
    assert_numerically_equal(model, pruned.model, _feeds())
    params0, macs0 = count_params_and_macs(model)
    params1, macs1 = count_params_and_macs(pruned.model)
    assert params1 < params0 and macs1 < macs0


def test_grouped_conv_it_cannot_split_is_left_alone_and_listed():
    rng = _rng(7)
    w1, b1, wb, wg, w2 = _conv(rng, 8, 3), _bias(rng, 8), _conv(rng, 8, 8), _conv(rng, 16, 1), _conv(rng, 4, 16, 1)
    # group = C_in with two outputs per input (a depthwise Conv with a channel multiplier): one input per group
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (ra, wb)
        g = Conv <pads = [1, 1, 1, 1], group = 8> (b, wg)
        rg = Relu (g)
        y = Conv (rg, w2)
        """,
        dict(w1=w1, b1=b1, wb=wb, wg=wg, w2=w2),
    )
    pruned = _prune(model)
    assert "group=8" in pruned.skipped_layers["g"]
    assert list(pruned.pruned_layers) == ["a"]
    inits = {t.name: tuple(t.dims) for t in pruned.model.graph.initializer}
    conv_shapes = [inits[n.input[1]] for n in pruned.model.graph.node if n.op_type == "Conv"]
    assert conv_shapes == [(4, 3, 3, 3), (8, 4, 3, 3), (16, 1, 3, 3), (4, 16, 1, 1)]
    assert run_model(pruned.model, {"x": _images(2, 1)})[0].shape == (2, 4, 8, 8)


def test_excluded_layer_keeps_its_channels():
    rng = _rng(8)
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (ra, w2)
        rb = Relu (b)
        y = Conv (rb, w3)
        """,
        dict(w1=_conv(rng, 8, 3), w2=_conv(rng, 8, 8), w3=_conv(rng, 4, 8, 1)),
    )
    model.graph.node[2].name = "keep_me"
    pruned = _prune(model, exclude_nodes=("keep_me",))
    assert pruned.skipped_layers["keep_me"] == "excluded"
    inits = {t.name: tuple(t.dims) for t in pruned.model.graph.initializer}
    conv_shapes = [inits[n.input[1]] for n in pruned.model.graph.node if n.op_type == "Conv"]
    assert conv_shapes == [(4, 3, 3, 3), (8, 4, 3, 3), (4, 8, 1, 1)]


# ------------------------------------------------------------------------------------------------
# Errors


def test_unprunable_model_is_a_clear_error():
    model = _model("y = Conv <pads = [1, 1, 1, 1]> (x, w)", dict(w=_conv(_rng(0), 4, 3)))
    with pytest.raises(UsageError, match="no channel group can be pruned"):
        prune_model(model, ChannelPruneConfig(ratio=0.5, repair=Repair.NONE))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_bad_ratio_is_rejected(ratio):
    with pytest.raises(UsageError, match="--ratio"):
        ChannelPruneConfig(ratio=ratio)


def test_repair_and_activation_importance_need_calibration():
    with pytest.raises(CalibrationDataError, match="calibration"):
        ChannelPruneConfig(ratio=0.5, repair=Repair.LEAST_SQUARES)
    with pytest.raises(CalibrationDataError, match="calibration"):
        ChannelPruneConfig(ratio=0.5, importance=Importance.ACTIVATION, repair=Repair.NONE)


# ------------------------------------------------------------------------------------------------
# Repair


def _dense_chain(seed: int, inputs: str = IMAGE) -> onnx.ModelProto:
    rng = _rng(seed)
    fc = (rng.standard_normal((5, 8 * 16)) * 0.1).astype(np.float32)
    return _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (ra, w2, b2)
        rb = Relu (b)
        f = Flatten (rb)
        y = Gemm <transB = 1> (f, fc, fb)
        """,
        dict(w1=_conv(rng, 8, 3), b1=_bias(rng, 8), w2=_conv(rng, 8, 8), b2=_bias(rng, 8), fc=fc, fb=_bias(rng, 5)),
        inputs=inputs,
        outputs="float[N,5] y",
    )


def test_least_squares_repair_reduces_output_error():
    model = _dense_chain(11)
    calibration = SampleSet({"x": _images(256, 20)}, None, "inline")
    config = ChannelPruneConfig(ratio=0.5, repair=Repair.NONE, round_to=1)
    pruned = prune_model(model, config)
    repaired, errors = repair_model(model, pruned, calibration, config)
    onnx.checker.check_model(repaired, full_check=True)
    assert set(errors) == set(pruned.repair_layers) and len(errors) == 2
    for layer, e in errors.items():
        assert e["after"] < e["before"], layer
    held_out = {"x": _images(64, 30)}
    (y,) = run_model(model, held_out)
    (y_pruned,) = run_model(pruned.model, held_out)
    (y_repaired,) = run_model(repaired, held_out)
    error = lambda out: float(np.linalg.norm(out - y) / np.linalg.norm(y))  # noqa: E731
    assert error(y_repaired) < 0.9 * error(y_pruned)


def test_repair_feeds_a_fixed_batch_model_in_its_own_batch_size():
    model = _dense_chain(13, inputs="float[4,3,8,8] x")
    calibration = SampleSet({"x": _images(64, 21)}, None, "inline")
    config = ChannelPruneConfig(ratio=0.5, repair=Repair.NONE, round_to=1)
    pruned = prune_model(model, config)
    _, errors = repair_model(model, pruned, calibration, config)
    assert errors and not any("skipped" in e for e in errors.values())
    # 64 samples for a Gemm with 65 weights per output: the held-out rows may refuse that refit, not the Conv's
    assert errors["b"]["after"] < errors["b"]["before"]


def test_activation_importance_keeps_the_live_channels():
    # channels 0..3 of the first Conv never fire on these inputs (large negative bias): activation
    # importance must remove them, even though their weights are the largest.
    rng = _rng(12)
    w1, b1 = _conv(rng, 8, 3), _bias(rng, 8)
    w1[:4] *= 10.0
    b1[:4] = -1000.0
    w2 = _conv(rng, 4, 8, 1)
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        y = Conv (ra, w2)
        """,
        dict(w1=w1, b1=b1, w2=w2),
    )
    calibration = SampleSet({"x": _images(16, 3)}, None, "inline")
    pruned = prune_model(model, ChannelPruneConfig(ratio=0.5, repair=Repair.NONE, round_to=1), calibration)
    assert pruned.kept_outputs["a"].tolist() == [0, 1, 2, 3]  # weight norm keeps the dead ones
    pruned = prune_model(
        # prune_model takes the samples directly; the config only records where they came from
        model,
        ChannelPruneConfig(
            ratio=0.5, importance=Importance.ACTIVATION, repair=Repair.NONE, calibration_data=Path("inline.npz"),
            round_to=1,
        ),
        calibration,
    )
    assert pruned.kept_outputs["a"].tolist() == [4, 5, 6, 7]
    assert_numerically_equal(model, pruned.model, _feeds())


def test_sensitivity_scan_prunes_the_robust_group_harder():
    # group A (first Conv's outputs) carries everything; group B has 6 of 8 channels nearly silent
    rng = _rng(14)
    w1, w2, w3 = _conv(rng, 8, 3), _conv(rng, 8, 8), _conv(rng, 4, 8, 1)
    w2[:6] *= 1e-3
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (ra, w2)
        rb = Relu (b)
        y = Conv (rb, w3)
        """,
        dict(w1=w1, w2=w2, w3=w3),
    )
    calibration = SampleSet({"x": _images(32, 5)}, None, "inline")
    config = ChannelPruneConfig(
        ratio=0.5, allocation=Allocation.SENSITIVITY, repair=Repair.NONE, calibration_data=Path("inline.npz"),
        round_to=1,
    )
    ratios, sensitivity = sensitivity_ratios(model, config, calibration)
    (group_a, group_b) = sorted(ratios)
    assert sensitivity[group_a] > 10 * sensitivity[group_b]
    assert ratios[group_b] > 0.5 > ratios[group_a]
    pruned = prune_model(model, config, calibration, ratios)
    kept = {name: len(idx) for name, idx in pruned.kept_outputs.items()}
    assert kept["a"] > 4 > kept["b"]
    with pytest.raises(CalibrationDataError, match="sensitivity"):
        ChannelPruneConfig(ratio=0.5, allocation=Allocation.SENSITIVITY, repair=Repair.NONE)


# ------------------------------------------------------------------------------------------------
# The stage and the CLI


@pytest.fixture
def residual_path(tmp_path):
    rng = _rng(1)
    wa, ba, wb, bb = _conv(rng, 8, 3), _bias(rng, 8), _conv(rng, 8, 8), _bias(rng, 8)
    fc, fb = (rng.standard_normal((5, 8)) * 0.5).astype(np.float32), _bias(rng, 5)
    model = _model(
        """
        a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (ra, wb, bb)
        s = Add (ra, b)
        rs = Relu (s)
        p = GlobalAveragePool (rs)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, fc, fb)
        """,
        dict(wa=wa, ba=ba, wb=wb, bb=bb, fc=fc, fb=fb),
        outputs="float[N,5] y",
    )
    return save(model, tmp_path / "residual.onnx")


@pytest.fixture
def residual_data(tmp_path, residual_path):
    images = _images(128, 40)
    labels = run_model(residual_path, {"x": images})[0].argmax(1).astype(np.int64)
    calib = tmp_path / "calib.npz"
    evaluation = tmp_path / "eval.npz"
    np.savez(calib, x=_images(64, 41))
    np.savez(evaluation, x=images, label=labels)
    return calib, evaluation


def test_prune_channels_writes_a_smaller_model_and_reports(tmp_path, residual_path, residual_data):
    calib, evaluation = residual_data
    out = tmp_path / "pruned.onnx"
    result = prune_channels(
        residual_path, out, ChannelPruneConfig(ratio=0.5, calibration_data=calib, eval_data=evaluation, tolerance=100.0,
                                         round_to=1)
    )
    report = result.to_json()
    json.dumps(report)
    assert out.exists() and result.repaired
    assert report["params_after"] < report["params_before"] and report["macs_ratio"] > 1.5
    assert result.score_before == 1.0 and result.score_after is not None and result.score_without_repair is not None
    assert set(result.repair_errors) and all(e["after"] <= e["before"] for e in result.repair_errors.values())
    run_model(out, {"x": _images(3, 0)})


def test_prune_channels_unmet_gate_saves_the_original_and_exits_4(tmp_path, residual_path, residual_data):
    _calib, evaluation = residual_data
    out = tmp_path / "pruned.onnx"
    with pytest.raises(QualityGateError) as info:
        # a negative tolerance can never be met: the loop backs off to its floor, then gives up
        prune_channels(
            residual_path, out, ChannelPruneConfig(ratio=0.5, repair=Repair.NONE, eval_data=evaluation, tolerance=-1.0)
        )
    assert info.value.exit_code == 4 and info.value.best_path == str(out)
    assert "pass --calibration" in info.value.hint  # no calibration was given: the repair needs it
    assert_numerically_equal(residual_path, out, {"x": _images(4, 2)})
    with pytest.raises(QualityGateError) as info:  # given: the hint never asks for it again
        prune_channels(residual_path, tmp_path / "repaired.onnx",
                       ChannelPruneConfig(ratio=0.5, calibration_data=_calib, eval_data=evaluation, tolerance=-1.0))
    assert "--calibration" not in info.value.hint and "--exclude" in info.value.hint


def test_cli_prune_channels_and_default_magnitude(tmp_path, cli, residual_path, residual_data):
    calib, evaluation = residual_data
    out = tmp_path / "c.onnx"
    report = tmp_path / "c.json"
    code, stdout, _ = cli(
        "prune",
        residual_path,
        "-o",
        out,
        "--method",
        "channels",
        "--ratio",
        "0.5",
        "--calibration",
        calib,
        "--eval",
        evaluation,
        "--tolerance",
        "100",
        "--round-to",
        "1",
        "--json",
        report,
    )
    assert code == 0, stdout
    data = json.loads(report.read_text())
    assert data["macs_after"] < data["macs_before"] and data["repaired"]
    code, _, _ = cli("prune", residual_path, "-o", tmp_path / "m.onnx", "--sparsity", "0.3")
    assert code == 0 and (tmp_path / "m.onnx").exists()
    code, _, err = cli("prune", residual_path, "-o", tmp_path / "x.onnx", "--method", "channels", "--sparsity", "0.3")
    assert code == 2 and "--sparsity" in err
    code, _, err = cli(
        "prune", residual_path, "-o", tmp_path / "x.onnx", "--method", "channels", "--repair", "least-squares"
    )
    assert code == 2 and "calibration" in err


@pytest.mark.slow
def test_demo_cnn_half_channels_with_repair_keeps_accuracy(tmp_path):
    from onnxforge.converters import ExportConfig, export
    from onnxforge.datasets import load_digits_split

    split = load_digits_split()
    fp32 = tmp_path / "fp32.onnx"
    export("builtin:digits_cnn", fp32, ExportConfig(dynamic_batch=True))
    np.savez(tmp_path / "calib.npz", image=split.train_images[:256])
    np.savez(tmp_path / "eval.npz", image=split.test_images, label=split.test_labels)
    result = prune_channels(
        fp32,
        tmp_path / "half.onnx",
        ChannelPruneConfig(
            ratio=0.5, calibration_data=tmp_path / "calib.npz", eval_data=tmp_path / "eval.npz", tolerance=100.0
        ),
    )
    assert result.macs_before / result.macs_after > 3.5
    assert result.score_after >= 0.98
    assert result.score_after > result.score_without_repair


# ------------------------------------------------------------------------------------------------
# Transformer FFN: MatMul + bias -> Erf-GELU (scalar constants) -> MatMul, channels on the last axis


def _ffn(seed: int, dead: list[int] | None = None) -> onnx.ModelProto:
    """A BERT FFN block as the dynamo exporter writes it: y = x + GELU(x W1 + b1) W2 + b2."""
    rng = _rng(seed)
    w1 = (rng.standard_normal((16, 48)) * 0.3).astype(np.float32)
    b1 = _bias(rng, 48)
    w2 = (rng.standard_normal((48, 16)) * 0.3).astype(np.float32)
    if dead:
        w1[:, dead], b1[dead], w2[dead] = 0, 0, 0
    return _model(
        """
        h = MatMul (x, w1)
        hb = Add (h, b1)
        d = Div (hb, sqrt2)
        e = Erf (d)
        e1 = Add (e, one)
        m = Mul (hb, e1)
        g = Mul (m, half)
        o = MatMul (g, w2)
        ob = Add (o, b2)
        y = Add (x, ob)
        """,
        dict(
            w1=w1,
            b1=b1,
            w2=w2,
            b2=_bias(rng, 16),
            sqrt2=np.array(1.4142135, np.float32),
            one=np.array(1.0, np.float32),
            half=np.array(0.5, np.float32),
        ),
        inputs="float[N,S,16] x",
        outputs="float[N,S,16] y",
    )


def _tokens(n: int, seed: int) -> np.ndarray:
    return _rng(seed).standard_normal((n, 5, 16)).astype(np.float32)


def test_transformer_ffn_follows_the_erf_gelu_and_removes_zero_channels_exactly():
    dead = list(range(0, 48, 2))
    model = _ffn(11, dead)
    pruned = _prune(model)
    prunable = [g for g in pruned.groups if g["prunable"]]
    assert len(prunable) == 1 and prunable[0]["channels"] == 48
    assert list(pruned.pruned_layers.values()) == ["48 -> 24"]
    inits = {t.name: tuple(t.dims) for t in pruned.model.graph.initializer}
    matmuls = [inits[n.input[1]] for n in pruned.model.graph.node if n.op_type == "MatMul"]
    assert matmuls == [(16, 24), (24, 16)]
    assert (24,) in inits.values() and (48,) not in inits.values()  # the bias followed
    assert_numerically_equal(model, pruned.model, [{"x": _tokens(1, 3)}, {"x": _tokens(4, 4)}])
    params0, macs0 = count_params_and_macs(model)
    params1, macs1 = count_params_and_macs(pruned.model)
    assert params1 < params0 and macs1 < macs0


def test_transformer_ffn_repair_refits_the_second_matmul():
    model = _ffn(12)
    calibration = SampleSet({"x": _tokens(64, 20)}, None, "test")
    config = ChannelPruneConfig(ratio=0.5, repair=Repair.LEAST_SQUARES, calibration_data=Path("calib.npz"))
    pruned = prune_model(model, config, calibration)
    repaired, errors = repair_model(model, pruned, calibration, config)
    assert list(errors) == ["o"]  # the consumer of the pruned channels, W2
    assert errors["o"]["after"] < errors["o"]["before"]
    held_out = {"x": _tokens(32, 21)}
    reference = run_model(model, held_out)[0]
    error_pruned = np.linalg.norm(run_model(pruned.model, held_out)[0] - reference)
    error_repaired = np.linalg.norm(run_model(repaired, held_out)[0] - reference)
    assert error_repaired < 0.8 * error_pruned


# ------------------------------------------------------------------------------------------------
# CLI errors: exit 2, one line, no output file


@pytest.mark.parametrize("ratio", ["0", "1", "-0.5", "1.5"])
def test_cli_bad_ratio_exits_2_without_output(tmp_path, cli, residual_path, ratio):
    out = tmp_path / "bad.onnx"
    code, stdout, err = cli("prune", residual_path, "-o", out, "--method", "channels", "--ratio", ratio)
    assert code == 2 and "--ratio" in err
    assert len([line for line in err.splitlines() if line.strip() and not line.lstrip().startswith("hint")]) == 1
    assert not out.exists() and "Traceback" not in err + stdout


def test_cli_unprunable_model_exits_2_without_output(tmp_path, cli):
    path = save(_model("y = Conv <pads = [1, 1, 1, 1]> (x, w)", dict(w=_conv(_rng(0), 4, 3))), tmp_path / "one.onnx")
    out = tmp_path / "pruned.onnx"
    code, stdout, err = cli("prune", path, "-o", out, "--method", "channels", "--ratio", "0.5")
    assert code == 2 and "no channel group can be pruned" in err
    assert not out.exists() and "Traceback" not in err + stdout
    assert not list(tmp_path.glob("pruned*"))  # no temporary file left behind either


def test_cli_repair_without_calibration_exits_2_without_output(tmp_path, cli, residual_path):
    out = tmp_path / "pruned.onnx"
    code, stdout, err = cli(
        "prune", residual_path, "-o", out, "--method", "channels", "--ratio", "0.5", "--repair", "least-squares"
    )
    assert code == 2 and "calibration" in err
    assert not out.exists() and "Traceback" not in err + stdout
