"""Static INT8 quantization: every candidate measured, the fastest within tolerance kept, the gate enforced."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import assert_numerically_equal, random_images, run_model

from onnxforge.errors import QualityGateError
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.quantize import QuantizeConfig, quantize
from onnxforge.pipeline.quantize import select as quantize_module
from onnxforge.targets import ActivationType, QuantFormat, QuantScheme

QUANT_OPS = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger"
}

# The tiny classifier is overhead-bound (int8 measures ~0.73x fp32), so quantize would keep the input and
# exit 4 (issue 23): these tests, about calibration, scoring and the choice among candidates, run with
# int8 timed 2x faster than fp32 (conftest.int8_faster); test_quantize_objective covers the real timings.
pytestmark = pytest.mark.usefixtures("int8_faster")

U8_PER_TENSOR = QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.UINT8, per_channel=False)
U8_PER_CHANNEL = QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.UINT8, per_channel=True)


def _fast(**kwargs) -> QuantizeConfig:
    kwargs.setdefault("latency_rounds", 3)
    return QuantizeConfig(**kwargs)


def test_keeps_the_fastest_candidate_within_tolerance(tmp_path, classifier_path, calibration_npz, eval_npz):
    output = tmp_path / "int8.onnx"
    result = quantize(classifier_path, output, calibration_npz, _fast(eval_data=eval_npz, tolerance=25))

    assert result.gate.metric is Metric.ACCURACY
    assert result.fp32_score == 1.0  # the labels are the fp32 model's own predictions
    assert result.eval_samples == 64 and result.calibration_samples == 64
    measured = [c for c in result.candidates if c.error is None]
    assert len(measured) >= 2
    chosen = result.chosen_candidate
    assert chosen.meets_tolerance
    assert (1.0 - chosen.score) * 100 <= 25
    passing = [c for c in measured if c.meets_tolerance]
    # the fastest passing candidate is kept; candidates within the tie band of the fastest count as
    # equally fast, and the better score wins, then the earliest in the target's order (issue 23)
    band = min(c.latency.p50_ms for c in passing) * (1.0 + getattr(quantize_module, "_LATENCY_TIE_FRACTION", 0.0))
    tied = [c for c in passing if c.latency.p50_ms <= band]
    assert chosen in tied and chosen.score == max(c.score for c in tied)
    assert all(c.score < chosen.score for c in tied[: tied.index(chosen)])
    for c in measured:
        assert 0 < c.latency.p50_ms <= c.latency.p90_ms <= c.latency.p99_ms
        assert c.speedup == pytest.approx(result.fp32_latency.p50_ms / c.latency.p50_ms)
        assert c.meets_tolerance == ((1.0 - c.score) * 100 <= 25 + 1e-9)

    model = onnx.load(str(output))
    onnx.checker.check_model(model)
    assert {n.op_type for n in model.graph.node} & QUANT_OPS
    assert output.stat().st_size < classifier_path.stat().st_size  # int8 weights


def test_the_saved_model_scores_what_the_result_says(tmp_path, classifier_path, calibration_npz, eval_npz):
    output = tmp_path / "int8.onnx"
    result = quantize(classifier_path, output, calibration_npz, _fast(eval_data=eval_npz, tolerance=25))
    data = np.load(eval_npz)
    predictions = run_model(output, {"x": data["x"]})[0].argmax(1)
    assert np.mean(predictions == data["label"]) == pytest.approx(result.chosen_candidate.score)
    # int8 stays close to fp32
    assert_numerically_equal(classifier_path, output, {"x": data["x"][:8]}, atol=0.3, rtol=0.3)


def test_only_the_requested_schemes_are_measured(tmp_path, classifier_path, calibration_npz):
    config = _fast(schemes=(U8_PER_TENSOR,), tolerance=100, mixed_precision=False)
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    assert [c.scheme for c in result.candidates] == [U8_PER_TENSOR.label]
    assert result.chosen == U8_PER_TENSOR.label
    model = onnx.load(str(tmp_path / "q.onnx"))
    # QDQ format: QuantizeLinear/DequantizeLinear pairs, float ops in between
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}


def test_without_eval_data_the_last_samples_are_held_out(tmp_path, classifier_path, calibration_npz):
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, _fast(tolerance=100))
    assert result.eval_samples == 13  # round(64 * 0.2)
    assert result.calibration_samples == 51
    assert result.gate.metric is Metric.AGREEMENT  # no labels, (N, classes) output
    assert any("held out" in note for note in result.notes)


def test_max_samples_caps_the_calibration_set(tmp_path, classifier_path, calibration_npz, eval_npz):
    config = _fast(eval_data=eval_npz, max_samples=10, tolerance=100)
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    assert result.calibration_samples == 10


def test_excluded_op_type_stays_in_float(tmp_path, classifier_path, calibration_npz):
    config = _fast(exclude_op_types=("Gemm",), tolerance=100, mixed_precision=False, schemes=(U8_PER_CHANNEL,))
    quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    model = onnx.load(str(tmp_path / "q.onnx"))
    produced_by = {out: n.op_type for n in model.graph.node for out in n.output}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    # the Gemm's weight is the original float initializer, not a dequantized int8 tensor
    assert gemm.input[1] == "fc_w" or produced_by.get(gemm.input[1]) != "DequantizeLinear"
    conv = next(n for n in model.graph.node if n.op_type in ("Conv", "QLinearConv"))
    assert conv.op_type == "QLinearConv" or produced_by.get(conv.input[1]) == "DequantizeLinear"


def test_gate_failure_saves_the_most_accurate_candidate(tmp_path, classifier_path, calibration_npz, eval_npz):
    output = tmp_path / "q.onnx"
    config = _fast(eval_data=eval_npz, metric=Metric.COSINE, tolerance=0.999999)
    with pytest.raises(QualityGateError) as info:
        quantize(classifier_path, output, calibration_npz, config)
    assert info.value.exit_code == 4
    assert info.value.best_path == str(output)
    model = onnx.load(str(output))
    onnx.checker.check_model(model)
    assert "0.999999" in info.value.message


def test_a_sample_set_can_be_passed_directly(tmp_path, classifier_path):
    from onnxforge.pipeline.calibration import SampleSet

    samples = SampleSet({"x": random_images(20, seed=4)}, None, "in memory")
    result = quantize(classifier_path, tmp_path / "q.onnx", samples, _fast(tolerance=100, schemes=(U8_PER_TENSOR,)))
    assert result.calibration_samples + result.eval_samples == 20


def test_result_json_is_serializable(tmp_path, classifier_path, calibration_npz, eval_npz):
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, _fast(eval_data=eval_npz, tolerance=25))
    data = json.loads(json.dumps(result.to_json(), default=str))
    assert data["chosen"] == result.chosen
    assert len(data["candidates"]) == len(result.candidates)
    assert data["fp32_latency"]["p50_ms"] > 0


# ----------------------------------------------------------------------------------------------
# The built-in demo CNN on real data (shares the session's demo run)


@pytest.mark.slow
def test_demo_quantization_keeps_accuracy_and_records_every_candidate(demo_run):
    assert demo_run.code == 0, demo_run.err
    manifest = json.loads((demo_run.run_dir / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s["kind"] == "quantize")
    result = stage["result"]
    assert result["metric"] == "accuracy"
    tolerance = result["tolerance"]
    assert tolerance == 0.5  # the demo recipe's quantize: {tolerance: 0.5}

    chosen = next(c for c in result["candidates"] if c["scheme"] == result["chosen"])
    drop_points = (result["fp32_score"] - chosen["score"]) * 100
    assert drop_points <= tolerance
    assert chosen["meets_tolerance"] is True
    assert result["fp32_score"] >= 0.95  # the shipped CNN is a real digits classifier

    candidates = result["candidates"]
    assert len(candidates) >= 4  # the CPU target proposes four schemes
    for candidate in candidates:
        if candidate["error"] is not None:
            continue
        latency = candidate["latency"]
        assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
        assert latency["runs"] > 0
        assert candidate["speedup_vs_fp32"] > 0
        assert candidate["score"] is not None
    assert result["fp32_latency"]["p50_ms"] > 0

    # the accuracy the runner measured on the saved file agrees with the stage's own number
    assert stage["metrics"]["accuracy"] == pytest.approx(chosen["score"], abs=1e-9)
