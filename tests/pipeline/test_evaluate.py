"""Quality metrics and gates: the numbers a quality gate passes or fails on."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_classifier, random_images

from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.evaluate import Metric, QualityGate, resolve_metric, run_outputs, score

REF = [np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])]


def test_accuracy_against_labels():
    assert score(Metric.ACCURACY, REF, REF, np.array([0, 1, 2, 1])) == 1.0
    assert score(Metric.ACCURACY, REF, REF, np.array([0, 1, 0, 0])) == 0.5
    with pytest.raises(ValueError):
        score(Metric.ACCURACY, REF, REF, None)


def test_agreement_with_the_reference():
    other = [REF[0][[0, 1, 2, 0]]]  # last sample now predicts class 0 instead of 1
    assert score(Metric.AGREEMENT, other, REF, None) == 0.75


def test_cosine_and_relative_error():
    assert score(Metric.COSINE, REF, REF, None) == pytest.approx(1.0)
    assert score(Metric.COSINE, [-REF[0]], REF, None) == pytest.approx(-1.0)
    assert score(Metric.REL_ERROR, REF, REF, None) == 0.0
    assert score(Metric.REL_ERROR, [REF[0] * 1.1], REF, None) == pytest.approx(0.1)


def test_auto_metric():
    assert resolve_metric(Metric.AUTO, True, (8, 10)) is Metric.ACCURACY
    assert resolve_metric(Metric.AUTO, False, (8, 10)) is Metric.AGREEMENT
    assert resolve_metric(Metric.AUTO, False, (8, 1)) is Metric.COSINE
    assert resolve_metric(Metric.AUTO, False, (8, 3, 16)) is Metric.COSINE
    assert resolve_metric(Metric.COSINE, True, (8, 10)) is Metric.COSINE


@pytest.mark.parametrize(
    ("metric", "tolerance", "candidate", "reference", "passes"),
    [
        (Metric.ACCURACY, 0.5, 0.990, 0.995, True),  # drop of exactly 0.5 points
        (Metric.ACCURACY, 0.5, 0.989, 0.995, False),
        (Metric.AGREEMENT, 1.0, 0.99, 1.0, True),
        (Metric.AGREEMENT, 1.0, 0.985, 1.0, False),
        (Metric.COSINE, 0.99, 0.995, 1.0, True),
        (Metric.COSINE, 0.99, 0.98, 1.0, False),
        (Metric.REL_ERROR, 0.05, 0.04, 0.0, True),
        (Metric.REL_ERROR, 0.05, 0.06, 0.0, False),
    ],
)
def test_gate(metric, tolerance, candidate, reference, passes):
    gate = QualityGate.resolve(metric, tolerance, True, (4, 10))
    assert gate.passes(candidate, reference) is passes


def test_default_tolerances_and_descriptions():
    assert QualityGate.resolve(Metric.AUTO, None, True, (4, 10)).tolerance == 0.5
    assert QualityGate.resolve(Metric.AUTO, None, False, (4, 10)).tolerance == 1.0
    gate = QualityGate.resolve(Metric.COSINE, None, False, (4, 1))
    assert gate.tolerance == 0.99 and "0.99" in gate.describe()
    assert QualityGate.resolve(Metric.ACCURACY, None, True, (4, 10)).format(0.98765) == "98.77%"


def test_run_outputs_concatenates_batches_in_order(classifier):
    import onnxruntime as ort

    session = ort.InferenceSession(classifier.SerializeToString(), providers=["CPUExecutionProvider"])
    images = random_images(10)
    samples = SampleSet({"x": images}, None, "mem")
    (batched,) = run_outputs(session, samples, batch_size=4)
    (whole,) = session.run(None, {"x": images})
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)


def test_run_outputs_pads_the_last_batch_of_a_fixed_batch_model():
    import onnxruntime as ort

    fixed = make_classifier(batch=4)
    session = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    dynamic = ort.InferenceSession(make_classifier().SerializeToString(), providers=["CPUExecutionProvider"])
    images = random_images(10)
    (got,) = run_outputs(session, SampleSet({"x": images}, None, "mem"), batch_size=4)
    assert got.shape == (10, 5)
    np.testing.assert_allclose(got, dynamic.run(None, {"x": images})[0], rtol=1e-5, atol=1e-6)
