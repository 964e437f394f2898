"""Low-rank factorization on tiny graphs: exact for weights of low rank, data-aware beats plain SVD."""

from __future__ import annotations


import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest
from conftest import assert_numerically_equal, run_model, save

from onnx_graphs import model_from_text
from onnxforge.errors import QualityGateError, UsageError
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.prune.low_rank import LowRankConfig, RankRule, factorize_model, low_rank


def _model(body: str, weights: dict[str, np.ndarray], inputs: str, outputs: str) -> onnx.ModelProto:
    return model_from_text(body, weights, inputs, outputs)


def _low_rank_matrix(rng, k: int, n: int, r: int) -> np.ndarray:
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(np.float32)


def _mlp(seed: int = 0, rank: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = _low_rank_matrix(rng, 64, 96, rank)
    w2 = _low_rank_matrix(rng, 96, 64, rank).T.copy()  # Gemm transB=1 stores [N, K]
    return _model(
        """
        h = MatMul (x, w1)
        r = Relu (h)
        y = Gemm <transB = 1> (r, w2, b2)
        """,
        dict(w1=w1, w2=w2, b2=(rng.standard_normal(64) * 0.1).astype(np.float32)),
        inputs="float[N,64] x",
        outputs="float[N,64] y",
    )


def _feeds(seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 64)).astype(np.float32)} for n in (1, 5)]


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_exact_low_rank_weights_factor_without_error():
    model = _mlp(rank=4)
    factored, layers, skipped = factorize_model(model, LowRankConfig(energy=0.999))
    assert [v["rank"] for v in layers.values()] == [4, 4] and not skipped
    assert _op_counts(factored) == {"MatMul": 3, "Relu": 1, "Gemm": 1}
    params = sum(int(np.prod(t.dims)) for t in factored.graph.initializer)
    assert params < sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 5
    assert_numerically_equal(model, factored, _feeds(), atol=1e-4)
    assert [o.name for o in factored.graph.output] == ["y"]


def test_one_by_one_conv_is_factored():
    rng = np.random.default_rng(1)
    w = _low_rank_matrix(rng, 48, 64, 3).T[:, :, None, None].copy()  # [Cout=64, Cin=48, 1, 1]
    model = _model(
        "y = Conv <strides = [2, 2]> (x, w, b)",
        dict(w=w, b=(rng.standard_normal(64) * 0.1).astype(np.float32)),
        inputs="float[N,48,6,6] x",
        outputs="float[N,64,3,3] y",
    )
    factored, layers, _ = factorize_model(model, LowRankConfig(energy=0.999, min_params=16))
    assert next(iter(layers.values()))["rank"] == 3
    feeds = {"x": rng.standard_normal((2, 48, 6, 6)).astype(np.float32)}
    assert_numerically_equal(model, factored, feeds, atol=1e-4)


def test_layers_where_it_does_not_pay_are_skipped():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 64)).astype(np.float32)  # full rank: 95% energy needs most of it
    model = _model("y = MatMul (x, w)", dict(w=w), inputs="float[N,64] x", outputs="float[N,64] y")
    factored, layers, skipped = factorize_model(model, LowRankConfig(energy=0.95))
    assert not layers and "does not pay" in next(iter(skipped.values()))
    assert_numerically_equal(model, factored, _feeds())


def test_data_aware_factorization_beats_plain_svd_on_correlated_inputs():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    model = _model("y = MatMul (x, w)", dict(w=w), inputs="float[N,64] x", outputs="float[N,64] y")
    mixing = rng.standard_normal((8, 64)).astype(np.float32)  # inputs live in an 8-dim subspace
    x_cal = (rng.standard_normal((512, 8)) @ mixing).astype(np.float32)
    x_test = (rng.standard_normal((128, 8)) @ mixing).astype(np.float32)
    config = LowRankConfig(rule=RankRule.RATIO, ratio=0.875)  # rank 8 of 64
    plain, _, _ = factorize_model(model, config)
    aware, layers, _ = factorize_model(model, config, SampleSet({"x": x_cal}, None, "inline"))
    assert next(iter(layers.values()))["rank"] == 8
    (y,) = run_model(model, {"x": x_test})
    error = lambda m: float(np.linalg.norm(run_model(m, {"x": x_test})[0] - y) / np.linalg.norm(y))  # noqa: E731
    assert error(aware) < 1e-3 < error(plain)


def test_bad_settings_are_rejected():
    with pytest.raises(UsageError):
        LowRankConfig(energy=1.0)
    with pytest.raises(UsageError):
        LowRankConfig(rule=RankRule.RATIO, ratio=0.0)


def test_low_rank_stage_saves_and_reports(tmp_path):
    model_path = save(_mlp(rank=4), tmp_path / "mlp.onnx")
    rng = np.random.default_rng(5)
    images = rng.standard_normal((64, 64)).astype(np.float32)
    labels = run_model(model_path, {"x": images})[0].argmax(1).astype(np.int64)
    np.savez(tmp_path / "eval.npz", x=images, label=labels)
    result = low_rank(model_path, tmp_path / "lr.onnx", LowRankConfig(energy=0.999, eval_data=tmp_path / "eval.npz"))
    assert result.score_after == result.score_before == 1.0
    assert result.params_after < result.params_before and set(result.latency_speedup) == {"b1", "b32"}
    # a gate that cannot be met: the input model is saved and exit code 4 raised
    with pytest.raises(QualityGateError) as info:
        low_rank(model_path, tmp_path / "lr2.onnx", LowRankConfig(energy=0.5, eval_data=tmp_path / "eval.npz", tolerance=-1.0))
    assert info.value.exit_code == 4
    assert_numerically_equal(model_path, tmp_path / "lr2.onnx", _feeds())


def test_cli_prune_low_rank(tmp_path, cli):
    model_path = save(_mlp(rank=4), tmp_path / "mlp.onnx")
    out = tmp_path / "lr.onnx"
    code, stdout, _ = cli("prune", model_path, "-o", out, "--method", "low-rank", "--ratio", "0.9")
    assert code == 0, stdout
    inits = {tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    # rank round((1 - 0.9) * 64) = 6 for both layers (their true rank is 4, so the factors are exact)
    assert inits == {(64, 6), (6, 96), (96, 6), (6, 64), (64,)}
    assert_numerically_equal(model_path, out, _feeds(), atol=1e-4)
