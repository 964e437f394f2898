"""Structure pruning is for speed (issue 23): channel counts round to the target's SIMD multiple by
default, and a candidate measured slower than its input is never handed back with exit 0 unless the
user asked for ``--objective size``.

Timings are monkeypatched (``reference.compare_latency``, through which every timing goes): a tiny
graph's real speedup is noise.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from conftest import assert_numerically_equal, run_model, save
from onnx_graphs import model_from_text

from onnxforge.errors import QualityGateError
from onnxforge.pipeline.prune.channel_rewrite import keep_count, removes_any
from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Repair, prune_model
from onnxforge.pipeline.prune.checks import Objective
from onnxforge.pipeline.prune.low_rank import LowRankConfig, low_rank
from onnxforge.targets import get_target
from onnxforge.targets.latency import LatencyStats


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _cnn(seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 24 -> Relu -> Conv 40 -> Relu -> GlobalAveragePool -> Gemm 5, plus a Conv of 6
    channels on a branch (narrower than the CPU's multiple of 8) added back through a 1x1 Conv."""
    rng = _rng(seed)

    def conv(cout: int, cin: int, k: int = 3) -> np.ndarray:
        return (rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (rng.standard_normal(n) * 0.1).astype(np.float32)

    weights = dict(w1=conv(24, 3), b1=bias(24), w2=conv(40, 24), b2=bias(40), w3=conv(6, 3), b3=bias(6),
                   w4=conv(40, 6, 1), b4=bias(40), fc=(rng.standard_normal((5, 40)) * 0.5).astype(np.float32),
                   fb=bias(5))
    body = """
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (ra, w2, b2)
        n = Conv <pads = [1, 1, 1, 1]> (x, w3, b3)
        rn = Relu (n)
        m = Conv (rn, w4, b4)
        s = Add (b, m)
        rs = Relu (s)
        p = GlobalAveragePool (rs)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, fc, fb)
    """
    return model_from_text(body, weights, "float[N,3,8,8] x", "float[N,5] y")


def _channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every Conv, by its output name."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n.output[0]: weights[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"}


def test_channel_counts_round_to_the_targets_multiple_by_default():
    assert get_target("cpu").channel_multiple == 8
    pruned = prune_model(_cnn(), ChannelPruneConfig(ratio=0.5, repair=Repair.NONE))
    channels = _channels(pruned.model)
    # 24 -> 12 and 40 -> 20 unrounded; the 6-channel layer is narrower than 8: not rounded up to 8 or down to 0
    assert channels == {"a": 16, "b": 16, "n": 3, "m": 16}, channels
    unrounded = _channels(prune_model(_cnn(), ChannelPruneConfig(ratio=0.5, repair=Repair.NONE, round_to=1)).model)
    assert unrounded == {"a": 12, "b": 20, "n": 3, "m": 20}, unrounded
    x = _rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert run_model(pruned.model, {"x": x})[0].shape == (2, 5)


def test_rounding_never_goes_past_a_layers_size_or_to_zero():
    assert keep_count(6, 0.5, 8) == 3  # narrower than the multiple: not rounded
    assert keep_count(6, 0.99, 8) == 1
    assert keep_count(8, 0.9, 8) == 8  # one multiple at least, never 0
    assert keep_count(24, 0.9, 8) == 8
    assert keep_count(15, 0.1, 8) == 15  # 14 rounds to 16: capped at the layer's size
    assert keep_count(40, 0.5, 8) == 16 and keep_count(40, 0.5, 1) == 20


def test_ratio_zero_removes_nothing_however_a_group_rounds():
    # 20 channels at ratio 0 would round to 16: rounding never prunes on its own (the back-off relies on it
    # to stop at ratio 0 when no head is left to remove)
    assert keep_count(20, 0.0, 16) == 20
    groups = [{"prunable": True, "channels": 20}, {"prunable": True, "channels": 40, "blocks": 2}]
    assert not removes_any(groups, 0.0, 16)
    assert removes_any(groups, 0.3, 16)


def test_the_cli_and_a_recipe_round_by_default(tmp_path, cli):
    model_path = save(_cnn(), tmp_path / "cnn.onnx")
    out, recipe = tmp_path / "p.onnx", tmp_path / "recipe.yaml"
    code, _, err = cli("prune", model_path, "-o", out, "--method", "channels", "--ratio", "0.5",
                       "--objective", "size", "--save-recipe", recipe)
    assert code == 0, err
    assert _channels(onnx.load(str(out))) == {"a": 16, "b": 16, "n": 3, "m": 16}
    assert "round_to" not in recipe.read_text()  # the default: the target's, resolved when the stage runs


# ----------------------------------------------------------------------------------------------
# The speed gate


def _stats(p50_ms: float) -> LatencyStats:
    return LatencyStats(p50_ms=p50_ms, p90_ms=p50_ms, p99_ms=p50_ms, mean_ms=p50_ms, std_ms=0.0, runs=5, batch=1,
                        samples_ms=(p50_ms,) * 5)


@pytest.fixture
def candidates_slower(monkeypatch):
    """Every candidate timed at 2.6x the input's p50 (0.38x its speed), as the Keras CNN of issue 23 was."""
    from onnxforge.pipeline import reference

    calls = []

    def slower(sessions, feeds, **_):
        calls.append(list(sessions))
        return {label: _stats(1.0 if label.startswith("__reference__") else 2.6) for label in sessions}

    monkeypatch.setattr(reference, "compare_latency", slower)
    return calls


@pytest.fixture
def eval_npz(tmp_path):
    images = _rng(2).standard_normal((32, 3, 8, 8)).astype(np.float32)
    labels = run_model(_cnn(), {"x": images})[0].argmax(1).astype(np.int64)
    path = tmp_path / "eval.npz"
    np.savez(path, x=images, label=labels)
    return path


def test_a_candidate_slower_than_its_input_exits_4_with_every_try(tmp_path, cli, eval_npz, candidates_slower):
    model_path = save(_cnn(), tmp_path / "cnn.onnx")
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code, _, err = cli("prune", model_path, "-o", out, "--method", "channels", "--ratio", "0.5",
                       "--eval", eval_npz, "--tolerance", "100", "--json", report)
    assert code == 4, err
    assert "slower than the input" in err and "--objective size" in err
    data = json.loads(report.read_text())
    tried = data["tried"]
    assert tried and all(t["slower"] and not t["passes"] for t in tried)
    assert all(t["speedup"] == pytest.approx(1 / 2.6) for t in tried)
    assert len(candidates_slower) == 2 * len(tried)  # a slower timing is confirmed once before it counts
    assert_numerically_equal(model_path, out, {"x": _rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)})


def test_objective_size_keeps_a_smaller_slower_model(tmp_path, cli, eval_npz, candidates_slower):
    model_path = save(_cnn(), tmp_path / "cnn.onnx")
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    code, _, err = cli("prune", model_path, "-o", out, "--method", "channels", "--ratio", "0.5",
                       "--eval", eval_npz, "--tolerance", "100", "--objective", "size", "--json", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["ratio"] == 0.5 and len(data["tried"]) == 1 and data["tried"][0]["speedup"] is None
    assert data["measured_speedup"] == pytest.approx(1 / 2.6)  # reported, not gated
    assert data["macs_after"] < data["macs_before"]


def test_a_slower_factorization_is_not_kept(tmp_path, candidates_slower):
    rng = _rng(4)
    w = (rng.standard_normal((64, 8)) @ rng.standard_normal((8, 96))).astype(np.float32)
    model_path = save(model_from_text("y = MatMul (x, w)", dict(w=w), "float[N,64] x", "float[N,96] y"),
                      tmp_path / "mm.onnx")
    x = rng.standard_normal((32, 64)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    config = LowRankConfig(energy=0.999, eval_data=tmp_path / "eval.npz")
    with pytest.raises(QualityGateError, match="slower than the input") as info:
        low_rank(model_path, tmp_path / "lr.onnx", config)
    assert info.value.exit_code == 4 and all(t["slower"] for t in info.value.result["tried"])
    assert_numerically_equal(model_path, tmp_path / "lr.onnx", {"x": x[:4]})
    result = low_rank(model_path, tmp_path / "lr2.onnx", replace(config, objective=Objective.SIZE))
    assert result.factored_layers and result.speed["speedup"] == pytest.approx(1 / 2.6)
