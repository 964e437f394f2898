"""Coarse-then-fine scoring: candidates ranked on a subset, only those that can be kept scored on all."""

from __future__ import annotations

import pytest
from conftest import latency_stats, random_images, write_npz

from onnxforge.pipeline.quantize import QuantizeConfig, quantize
from onnxforge.pipeline.quantize.coarse_scoring import COARSE_MIN, coarse_count, refine
from onnxforge.pipeline.quantize.config import CandidateResult


def _candidate(name: str, p50: float, passes: bool) -> CandidateResult:
    c = CandidateResult(name, score=0.9, meets_tolerance=passes, scored_samples=COARSE_MIN)
    c.latency = latency_stats(p50)
    return c


def test_only_the_fastest_that_can_be_kept_are_scored_on_all_samples():
    failing_fast = _candidate("a", 1.0, passes=False)  # failed the subset: never scored again
    fails_on_all = _candidate("b", 2.0, passes=True)
    kept = _candidate("c", 3.0, passes=True)
    tied = _candidate("d", 3.1, passes=True)  # inside the 5% tie band of the kept one: its full score decides
    slower = _candidate("e", 4.0, passes=True)
    full = {"b": (0.5, False), "c": (0.97, True), "d": (0.99, True)}
    asked: list[str] = []

    def score_all(c):
        asked.append(c.scheme)
        return full[c.scheme]

    assert refine([failing_fast, fails_on_all, kept, tied, slower], score_all, 0.05) == 3
    assert asked == ["b", "c", "d"]
    assert not fails_on_all.meets_tolerance and fails_on_all.scored_samples is None and tied.score == 0.99
    assert slower.scored_samples == COARSE_MIN and failing_fast.scored_samples == COARSE_MIN
    assert refine([failing_fast, fails_on_all, kept, tied, slower], score_all, 0.05) == 0  # nothing twice


def test_coarse_count_needs_enough_samples():
    assert coarse_count(2 * COARSE_MIN - 1) is None and coarse_count(2 * COARSE_MIN) == COARSE_MIN
    assert coarse_count(400) == 100


@pytest.mark.usefixtures("int8_faster")
def test_quantize_ranks_on_a_subset_and_keeps_only_a_fully_scored_candidate(tmp_path, classifier_path,
                                                                            calibration_npz):
    eval_path = write_npz(tmp_path / "eval.npz", x=random_images(128, seed=3))
    config = QuantizeConfig(eval_data=eval_path, tolerance=100, mixed_precision=False, latency_rounds=3)
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)
    assert result.eval_samples == 128
    assert result.chosen_candidate.scored_samples is None  # the kept one is scored on every held-out sample
    assert all(c.scored_samples in (None, 32) for c in result.candidates)
    assert any("ranked on the first 32 of 128 held-out samples" in n for n in result.notes)
