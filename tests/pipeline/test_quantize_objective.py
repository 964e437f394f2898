"""The input is always a candidate (issue 23): quantize keeps a quantized model only when it improves on
the input (faster, or smaller with ``objective: size``); else it writes the input unchanged and exits 4
with every candidate's numbers. Timing ties go to the better score, never to a difference in the noise."""

from __future__ import annotations

import json

import pytest
from conftest import latency_stats

from onnxforge.errors import QualityGateError
from onnxforge.pipeline.evaluate import Metric, QualityGate
from onnxforge.pipeline.quantize import Objective, QuantizeConfig, quantize
from onnxforge.pipeline.quantize.config import INPUT_KEPT, CandidateResult
from onnxforge.targets import ActivationType, QuantFormat, QuantScheme

U8_PER_TENSOR = QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.UINT8, per_channel=False)
U8_PER_CHANNEL = QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.UINT8, per_channel=True)
QOP_PER_CHANNEL = QuantScheme(format=QuantFormat.QOPERATOR, activations=ActivationType.UINT8, per_channel=True)


def _config(**kwargs) -> QuantizeConfig:
    kwargs.setdefault("latency_rounds", 3)
    kwargs.setdefault("mixed_precision", False)
    return QuantizeConfig(**kwargs)


@pytest.fixture
def timings(monkeypatch):
    """Interleaved timings a test decides: ``timings.update({label: p50_ms})``; the reference (fp32) is
    1 ms, any other label not given 0.5 ms."""
    from onnxforge.pipeline import reference

    chosen: dict[str, float] = {}

    def timed(sessions, feeds, rounds=20, **_):
        first = next(iter(sessions))  # time_against puts the reference first
        return {label: latency_stats(1.0 if label == first else chosen.get(label, 0.5)) for label in sessions}

    monkeypatch.setattr(reference, "compare_latency", timed)
    return chosen


def test_the_input_is_kept_when_every_int8_candidate_is_slower(cli, tmp_path, classifier_path, calibration_npz,
                                                                eval_npz):
    """Real timings: make_classifier is overhead-bound, int8 measures ~0.73x fp32 on every scheme."""
    output, report = tmp_path / "q.onnx", tmp_path / "q.json"
    code, out, err = cli("quantize", classifier_path, "-o", output, "--calibration", calibration_npz,
                         "--eval", eval_npz, "--tolerance", "100", "--no-mixed-precision", "--no-cache",
                         "--json", report)
    assert code == 4, out + err
    assert output.read_bytes() == classifier_path.read_bytes()  # the input, unchanged
    data = json.loads(report.read_text())
    assert data["kept_input"] is True and data["chosen"] == INPUT_KEPT and data["objective"] == "latency"
    assert data["fp32_latency"]["p50_ms"] > 0 and len(data["candidates"]) >= 2
    for c in data["candidates"]:
        if c["error"]:  # the profiled scheme, when no op type measured faster in int8 (the usual answer here)
            assert "no op type runs faster in int8" in c["error"] and "profiled" in c["scheme"]
            continue
        assert c["meets_tolerance"] and c["speedup_vs_fp32"] < 1.05
        assert c["agreement_with_input"] is not None and 0.0 <= c["agreement_with_input"] <= 1.0  # labels given
    assert "no quantized candidate is faster than the input on cpu" in err and "the input is kept" in err
    assert "kept the input: no candidate within tolerance was faster" in out
    assert "fp32 (input)" in out and "kept: the input" in out and "chosen" not in out
    assert "agrees with input" in out  # the churn column, with labels


def test_a_candidate_faster_than_the_input_is_kept(tmp_path, classifier_path, calibration_npz, timings):
    timings.update({U8_PER_TENSOR.label: 0.6, U8_PER_CHANNEL.label: 0.4})
    config = _config(schemes=(U8_PER_TENSOR, U8_PER_CHANNEL), tolerance=100)
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    assert result.chosen == U8_PER_CHANNEL.label and not result.kept_input
    assert result.chosen_candidate.speedup == pytest.approx(2.5)
    assert result.chosen_candidate.agreement_with_input is None  # no labels: the metric is agreement already
    assert (tmp_path / "q.onnx").read_bytes() != classifier_path.read_bytes()


def test_a_candidate_inside_the_noise_band_of_the_input_keeps_the_input(tmp_path, classifier_path, calibration_npz,
                                                                         timings):
    timings.update({U8_PER_TENSOR.label: 0.97})  # 1.03x: within the 5% tie band, where quality (fp32) wins
    config = _config(schemes=(U8_PER_TENSOR,), tolerance=100)
    with pytest.raises(QualityGateError) as info:
        quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    assert info.value.exit_code == 4 and info.value.result is not None
    assert info.value.result["kept_input"] is True
    assert "1.03x, inside the 5% timing noise" in info.value.message
    assert (tmp_path / "q.onnx").read_bytes() == classifier_path.read_bytes()


def test_a_timing_tie_goes_to_the_more_accurate_scheme():
    from onnxforge.pipeline.quantize.select import _fastest

    gate = QualityGate(metric=Metric.ACCURACY, tolerance=1.0)
    earlier = CandidateResult("earlier", score=0.90, latency=latency_stats(1.0))
    accurate = CandidateResult("accurate", score=0.95, latency=latency_stats(1.02))  # slower, inside the noise
    assert _fastest([earlier, accurate], gate) is accurate
    rel_error = QualityGate(metric=Metric.REL_ERROR, tolerance=1.0)  # lower is better there
    assert _fastest([earlier, accurate], rel_error) is earlier
    accurate.latency = latency_stats(1.2)  # clearly slower: speed decides
    assert _fastest([earlier, accurate], gate) is earlier


def test_a_timing_tie_in_a_run_keeps_the_more_accurate_scheme(tmp_path, classifier_path, calibration_npz, timings):
    # per-channel first in the order and 2% "faster" (inside the noise); per-tensor is the more accurate
    # here (mean cosine to fp32, deterministic calibration)
    timings.update({U8_PER_CHANNEL.label: 0.50, U8_PER_TENSOR.label: 0.51})
    config = _config(schemes=(U8_PER_CHANNEL, U8_PER_TENSOR), metric=Metric.COSINE, tolerance=0.0)
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    scores = {c.scheme: c.score for c in result.candidates}
    assert scores[U8_PER_TENSOR.label] > scores[U8_PER_CHANNEL.label]
    assert result.chosen == U8_PER_TENSOR.label


def test_objective_size_keeps_the_smallest(tmp_path, classifier_path, calibration_npz):
    """Real timings (every candidate slower): size does not ask for speed."""
    config = _config(schemes=(U8_PER_CHANNEL, QOP_PER_CHANNEL, U8_PER_TENSOR), tolerance=100,
                     objective=Objective.SIZE)
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    sizes = {c.scheme: c.bytes for c in result.candidates}
    assert result.chosen == min(sizes, key=lambda label: sizes[label]) and not result.kept_input
    assert result.to_json()["objective"] == "size"
    assert (tmp_path / "q.onnx").stat().st_size < classifier_path.stat().st_size


def test_objective_size_keeps_the_input_when_no_candidate_is_smaller(tmp_path, classifier_path, calibration_npz):
    # the Gemm holds most of the weights: kept in float, the int8 Conv's QDQ nodes make the model larger
    config = _config(schemes=(U8_PER_CHANNEL,), tolerance=100, objective=Objective.SIZE, exclude_op_types=("Gemm",))
    with pytest.raises(QualityGateError) as info:
        quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    assert "no quantized candidate is smaller than the input" in info.value.message
    assert (tmp_path / "q.onnx").read_bytes() == classifier_path.read_bytes()


def test_objective_is_a_cli_flag(cli, tmp_path, classifier_path, calibration_npz):
    code, out, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz,
                         "--tolerance", "100", "--no-mixed-precision", "--objective", "size", "--scheme",
                         "qoperator-u8s8-per-channel", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["objective"] == "size"
