"""The min-cosine metric: the worst sample's cosine, a gate that a mean cannot hide a bad sample behind."""

from __future__ import annotations

import numpy as np
import pytest

from onnxforge.errors import QualityGateError
from onnxforge.pipeline.evaluate import Metric, QualityGate, score

REF = [np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.5]])]


def _ragged(rows):
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = np.asarray(r, dtype=np.float32)
    return out


def test_min_cosine_is_the_worst_sample():
    bent = [REF[0].copy()]
    bent[0][1] = [1.0, 1.0]  # sample 1 now at 45 degrees: cosine 0.7071, the others exact
    assert score(Metric.MIN_COSINE, bent, REF, None) == pytest.approx(np.sqrt(0.5))
    assert score(Metric.COSINE, bent, REF, None) == pytest.approx((3 + np.sqrt(0.5)) / 4)
    assert score(Metric.MIN_COSINE, REF, REF, None) == pytest.approx(1.0)


def test_min_cosine_on_ragged_outputs():
    ref = [_ragged([[1.0, 0.0, 0.0], [0.0, 1.0], [3.0]])]
    got = [_ragged([[1.0, 0.0, 0.0], [1.0, 1.0], [3.0]])]
    assert score(Metric.MIN_COSINE, got, ref, None) == pytest.approx(np.sqrt(0.5), rel=1e-6)
    assert score(Metric.COSINE, got, ref, None) == pytest.approx((2 + np.sqrt(0.5)) / 3, rel=1e-6)


def test_min_cosine_gate_fails_where_the_mean_passes():
    rows = np.ones((100, 4))
    got = rows.copy()
    got[7] = [1.0, 1.0, 1.0, -0.2]  # one bad sample among 99 exact ones
    mean, worst = score(Metric.COSINE, [got], [rows], None), score(Metric.MIN_COSINE, [got], [rows], None)
    mean_gate = QualityGate.resolve(Metric.COSINE, None, False, (100, 4))
    min_gate = QualityGate.resolve(Metric.MIN_COSINE, None, False, (100, 4))
    assert min_gate.tolerance == 0.99 and min_gate.higher_is_better
    assert mean_gate.passes(mean, 1.0)
    assert not min_gate.passes(worst, 1.0)
    assert "every sample" in min_gate.describe()


def test_quantize_reports_min_cosine_gate(tmp_path, classifier_path, calibration_npz, eval_npz, int8_faster):
    from onnxforge.pipeline.quantize import QuantizeConfig, quantize

    config = QuantizeConfig(eval_data=eval_npz, metric=Metric.MIN_COSINE, tolerance=0.5, latency_rounds=3,
                            error_report=False, mixed_precision=False)
    try:
        result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    except QualityGateError:
        pytest.fail("a 0.5 worst-sample cosine must hold for int8 on the tiny classifier")
    assert result.to_json()["metric"] == "min-cosine"
    for c in result.candidates:
        if c.score is not None:
            assert c.meets_tolerance == (c.score >= 0.5)
    assert result.fp32_score == pytest.approx(1.0)
