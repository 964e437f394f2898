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
    # timed at the model's own batch size: 1 for a dynamic batch (a fixed batch is timed at its size)
    assert result.params_after < result.params_before and set(result.latency_speedup) == {"b1"}
    assert result.speed["speedup"] == result.latency_speedup["b1"] and "eval data" in result.quality
    # a gate that cannot be met: the input model is saved and exit code 4 raised
    with pytest.raises(QualityGateError) as info:
        low_rank(
            model_path,
            tmp_path / "lr2.onnx",
            LowRankConfig(energy=0.5, eval_data=tmp_path / "eval.npz", tolerance=-1.0),
        )
    assert info.value.exit_code == 4 and "pass --calibration" in info.value.hint
    assert_numerically_equal(model_path, tmp_path / "lr2.onnx", _feeds())
    with pytest.raises(QualityGateError) as info:  # the hint never asks for what was given
        low_rank(model_path, tmp_path / "lr3.onnx", LowRankConfig(energy=0.5, eval_data=tmp_path / "eval.npz",
                                                                  calibration_data=tmp_path / "eval.npz",
                                                                  tolerance=-1.0))
    assert "--calibration" not in info.value.hint and "raise --energy (now 0.5)" in info.value.hint


def test_cli_prune_low_rank(tmp_path, cli):
    model_path = save(_mlp(rank=4), tmp_path / "mlp.onnx")
    out = tmp_path / "lr.onnx"
    # objective size: this checks the factor shapes; under the default latency objective a loaded machine
    # can time the tiny factored MLP slower twice and back off to another rank
    code, stdout, _ = cli("prune", model_path, "-o", out, "--method", "low-rank", "--ratio", "0.9",
                          "--objective", "size")
    assert code == 0, stdout
    inits = {tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    # rank round((1 - 0.9) * 64) = 6 for both layers (their true rank is 4, so the factors are exact)
    assert inits == {(64, 6), (6, 96), (96, 6), (6, 64), (64,)}
    assert_numerically_equal(model_path, out, _feeds(), atol=1e-4)


def _offset_inputs(rng, n: int, mixing: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return (offset + rng.standard_normal((n, mixing.shape[0])) @ mixing).astype(np.float32)


def test_rank_comes_from_centred_statistics_and_the_mean_is_kept_in_the_bias():
    # Real activations have a large mean (post-ReLU features, a classifier's input): on the uncentred
    # second moment the mean direction held ~97% of the energy and the rank came out as 1 (PP-OCR's
    # recognizer: OCR 47/50 -> 0/50). Centred, the rank follows the spread of the inputs.
    rng = np.random.default_rng(6)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    b = (rng.standard_normal(64) * 0.1).astype(np.float32)
    model = _model("y = Gemm (x, w, b)", dict(w=w, b=b), inputs="float[N,64] x", outputs="float[N,64] y")
    mixing = rng.standard_normal((12, 64)).astype(np.float32) * 0.3  # the inputs vary in a 12-dim subspace
    offset = rng.uniform(5.0, 10.0, 64).astype(np.float32)
    x_cal, x_held, x_test = (_offset_inputs(rng, n, mixing, offset) for n in (512, 128, 128))
    held = SampleSet({"x": x_held}, None, "held")
    factored, layers, _ = factorize_model(model, LowRankConfig(energy=0.95), SampleSet({"x": x_cal}, None, "cal"))
    info = next(iter(layers.values()))
    assert 4 <= info["rank"] <= 12  # not 1
    (y,) = run_model(model, {"x": x_test})
    (got,) = run_model(factored, {"x": x_test})
    spread = np.linalg.norm(y - y.mean(0))
    assert np.linalg.norm(got - y) / spread < 0.25  # the mean part of the output is exact
    # the per-layer output error is measured on held-out samples
    import onnx_ir as ir

    from onnxforge.pipeline.prune.low_rank import _input_moments, layer_candidates  # noqa: F401

    node = next(iter(ir.from_proto(model).graph))
    _, layers, _ = factorize_model(
        model,
        LowRankConfig(energy=0.95),
        SampleSet({"x": x_cal}, None, "cal"),
        held=_input_moments(model, [node], held),
    )
    error = next(iter(layers.values()))["output_error"]
    (got_held,) = run_model(factored, {"x": x_held})
    (y_held,) = run_model(model, {"x": x_held})
    assert error == pytest.approx(np.linalg.norm(got_held - y_held) / np.linalg.norm(y_held - y_held.mean(0)), rel=0.05)


def test_a_matmul_without_bias_gets_the_mean_shift_as_an_add():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    model = _model("y = MatMul (x, w)", dict(w=w), inputs="float[N,64] x", outputs="float[N,64] y")
    mixing = rng.standard_normal((6, 64)).astype(np.float32)
    offset = rng.uniform(3.0, 6.0, 64).astype(np.float32)
    x_cal, x_test = _offset_inputs(rng, 256, mixing, offset), _offset_inputs(rng, 64, mixing, offset)
    factored, _, _ = factorize_model(
        model, LowRankConfig(rule=RankRule.RATIO, ratio=0.875), SampleSet({"x": x_cal}, None, "cal")
    )
    assert [n.op_type for n in factored.graph.node] == ["MatMul", "MatMul", "Add"]
    assert [o.name for o in factored.graph.output] == ["y"]
    assert_numerically_equal(model, factored, {"x": x_test}, atol=1e-2, rtol=1e-3)


def test_a_fixed_batch_model_is_timed_at_its_own_batch_and_written_only_at_the_end(tmp_path):
    # timing at batch 32 failed on fixed-batch models, after the file had been written
    model = _mlp(rank=4)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 4
    model_path = save(model, tmp_path / "mlp4.onnx")
    rng = np.random.default_rng(8)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((40, 64)).astype(np.float32))
    result = low_rank(
        model_path, tmp_path / "lr.onnx", LowRankConfig(energy=0.999, calibration_data=tmp_path / "calib.npz")
    )
    assert set(result.latency_speedup) == {"b4"} and result.speed["batch"] == 4
    assert "held-out calibration samples" in result.quality and result.score_after >= 0.99
    assert all("output_error" in info for info in result.factored_layers.values())


@pytest.mark.parametrize("spectrum", ["rank_deficient", "indefinite"])
def test_a_covariance_cholesky_refuses_falls_back_instead_of_crashing(spectrum):
    # PP-OCR's detector: "internal error: LinAlgError: Matrix is not positive definite" from the Cholesky
    # of an activation covariance (few samples, dead channels, float32 cancellation)
    from onnxforge.pipeline.prune.low_rank import _Moments

    rng = np.random.default_rng(9)
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    values = np.zeros(64)
    values[:6] = [4.0, 3.0, 2.0, 1.0, 0.5, 0.25]  # six directions carry the inputs, the rest nothing
    if spectrum == "indefinite":
        values[6:10] = -0.05  # rounding gone wrong: negative eigenvalues far past any small damping
    moments = _Moments(origin=np.zeros(64), count=1, total=np.zeros(64), outer=(q * values) @ q.T)
    if spectrum == "indefinite":
        with pytest.raises(np.linalg.LinAlgError):
            np.linalg.cholesky(moments.covariance + 1e-3 * np.eye(64))
    model = _mlp(rank=4)
    factored, layers, _ = factorize_model(model, LowRankConfig(energy=0.95), fit={"x": moments})
    assert layers and all(info["rank"] >= 1 for info in layers.values())
    x = (rng.standard_normal((16, 6)) @ (q[:, :6] * np.sqrt(values[:6])).T).astype(np.float32)
    (y,) = run_model(model, {"x": x})
    (got,) = run_model(factored, {"x": x})
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - y) / np.linalg.norm(y) < 0.5  # whitened along the directions the inputs use
