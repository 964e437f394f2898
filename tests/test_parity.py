"""Parity: each output's worst error held to atol + rtol * max|ref|, worst errors reported, shapes and
non-finite values caught."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_classifier, random_images

from onnxforge.parity import OutputParity, ParityReport, Tolerance, compare_models, compare_outputs


def test_identical_outputs_pass_with_zero_error():
    ref = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    report = compare_outputs(["y"], [ref], [ref.copy()])
    assert report.ok
    assert report.max_abs == 0.0
    assert report.outputs[0].max_rel == 0.0


def test_error_within_atol_plus_rtol_times_the_outputs_scale_passes_and_beyond_fails():
    ref = np.array([0.0, 10.0], dtype=np.float32)
    tol = Tolerance(atol=1e-3, rtol=1e-2)
    # allowed anywhere in the output: 1e-3 + 1e-2 * max|ref| = 0.101, also at the element that is 0.0
    inside = compare_outputs(["y"], [ref], [ref + np.array([0.1, 0.0], np.float32)], tol)
    assert inside.ok
    assert inside.outputs[0].allowed == pytest.approx(0.101)
    assert inside.outputs[0].scale == pytest.approx(10.0)
    outside = compare_outputs(["y"], [ref], [ref + np.array([0.0, 0.102], np.float32)], tol)
    assert not outside.ok
    assert outside.max_abs == pytest.approx(0.102, rel=1e-3)


def test_large_magnitude_logits_pass_at_the_default_tolerance_and_the_message_gives_both_numbers():
    # fp32 logits of size ~1e3 after a correct export: an error of 1.4e-4 sits near 0 and near 1e3 alike
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((4, 1000)) * 400).astype(np.float32)
    ref[0, 0] = 1.0e-3
    got = ref.copy()
    got[0, 0] += 1.4e-4  # beside a near-zero logit: the per-element rule (1e-4 + 1e-3 * 1e-3) failed it
    report = compare_outputs(["logits"], [ref], [got])
    assert report.ok
    assert not np.allclose(got, ref, atol=1e-4, rtol=1e-3)  # the old per-element rule
    # beyond the bound it fails, and the message states the error and the bound it broke
    scale = float(np.abs(ref).max())
    bad = ref.copy()
    bad[1, 1] += 2e-3 * scale
    failed = compare_outputs(["logits"], [ref], [bad])
    assert not failed.ok
    text = failed.summary()
    allowed = 1e-4 + 1e-3 * scale
    assert f"{failed.max_abs:.3g} > allowed {allowed:.3g}" in text
    assert f"max|ref| {scale:.3g}" in text and "'logits'" in text


def test_relative_error_does_not_explode_near_zero():
    ref = np.array([0.0, 1e-12], dtype=np.float64)
    got = ref + 1e-5
    report = compare_outputs(["y"], [ref], [got], Tolerance(atol=1e-4, rtol=1e-3))
    # divided by max(|ref|, atol) = 1e-4, not by 1e-12
    assert report.outputs[0].max_rel == pytest.approx(0.1, rel=1e-6)
    assert report.ok


def test_shape_mismatch_fails():
    report = compare_outputs(["y"], [np.zeros((2, 3))], [np.zeros((3, 2))])
    assert not report.ok
    assert report.max_abs == float("inf")


def test_nan_in_candidate_fails_but_identical_nans_pass():
    ref = np.array([1.0, np.nan, 3.0])
    assert compare_outputs(["y"], [ref], [ref.copy()]).ok
    assert not compare_outputs(["y"], [np.array([1.0, 2.0, 3.0])], [ref]).ok
    assert not compare_outputs(["y"], [ref], [np.array([1.0, np.inf, 3.0])]).ok


def test_integer_outputs_must_match_exactly():
    ref = np.array([1, 2, 3], dtype=np.int64)
    assert compare_outputs(["ids"], [ref], [ref.copy()]).ok
    report = compare_outputs(["ids"], [ref], [np.array([1, 2, 4], dtype=np.int64)], Tolerance(atol=10, rtol=10))
    assert not report.ok


def test_one_bad_output_fails_the_report_and_is_the_worst():
    ref = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    got = [np.zeros(3, np.float32), np.ones(3, np.float32) + 0.5]
    report = compare_outputs(["a", "b"], ref, got)
    assert not report.ok
    assert [o.ok for o in report.outputs] == [True, False]
    assert report.worst().name == "b"
    assert "FAILED" in report.summary() and "'b'" in report.summary()


def test_missing_candidate_output_fails():
    ref = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    report = compare_outputs(["a", "b"], ref, ref[:1])
    assert not report.ok


def test_merged_keeps_the_worst_case_and_every_batch_size():
    tol = Tolerance()
    at_1 = ParityReport([OutputParity("y", 1e-6, 1e-5, True)], tol, (1,))
    at_3 = ParityReport([OutputParity("y", 5e-3, 1e-7, False)], tol, (3,))
    merged = at_1.merged(at_3)
    assert merged.batch_sizes == (1, 3)
    (y,) = merged.outputs
    assert (y.max_abs, y.max_rel, y.ok) == (5e-3, 1e-5, False)
    assert not merged.ok


def test_report_json_round_trips_the_numbers():
    report = compare_outputs(["y"], [np.zeros(2)], [np.full(2, 0.25)], Tolerance(atol=0.1, rtol=0.0))
    data = report.to_json()
    assert data["ok"] is False
    assert data["atol"] == 0.1 and data["rtol"] == 0.0
    assert data["outputs"] == [{"name": "y", "max_abs_error": 0.25, "max_rel_error": 2.5, "ok": False,
                                "scale": 0.0, "allowed": 0.1}]
    back = ParityReport.from_json(data)
    assert back.outputs == report.outputs and back.summary() == report.summary()


def test_compare_models_same_model_passes_at_two_batch_sizes(classifier):
    data = classifier.SerializeToString()
    feeds = [{"x": random_images(1, seed=s)} for s in range(2)] + [{"x": random_images(3)}]
    report = compare_models(data, data, feeds)
    assert report.ok
    assert report.batch_sizes == (1, 3)
    assert [o.name for o in report.outputs] == ["logits"]


def test_compare_models_catches_a_changed_weight(classifier, tmp_path):
    changed = make_classifier()
    fc_w = next(i for i in changed.graph.initializer if i.name == "fc_w")
    array = onnx.numpy_helper.to_array(fc_w).copy()
    array[0, 0] += 1.0
    fc_w.CopyFrom(onnx.numpy_helper.from_array(array, "fc_w"))
    path = tmp_path / "changed.onnx"
    path.write_bytes(changed.SerializeToString())
    report = compare_models(classifier.SerializeToString(), str(path), [{"x": random_images(4)}])
    assert not report.ok
    assert report.max_abs > 1e-3
