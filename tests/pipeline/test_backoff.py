"""back_off: the tolerance loop the prune stages share."""

from __future__ import annotations

from onnxforge.pipeline.prune.backoff import back_off, shrink


def test_keeps_the_first_strength_that_passes():
    tried = []

    def attempt(ratio):
        tried.append(ratio)
        return f"pruned at {ratio:.3f}", ratio < 0.3

    kept = back_off(0.5, attempt, lambda ratio, _: shrink(ratio))
    assert kept.passed and kept.outcome == "pruned at 0.281" and kept.last == tried[-1]
    assert tried == [0.5, 0.375, 0.28125]


def test_returns_the_first_try_when_nothing_passes():
    tried = []

    def attempt(ratio):
        tried.append(ratio)
        return ratio, False

    kept = back_off(0.5, attempt, lambda ratio, _: shrink(ratio))
    assert not kept.passed and kept.outcome == 0.5
    assert min(tried) >= 0.05 and min(tried) * 0.75 < 0.05  # stopped at the floor


def test_lower_may_stop_on_the_outcome():
    kept = back_off(0.9, lambda e: ("nothing factored", False), lambda e, outcome: None)
    assert kept == ("nothing factored", False, 0.9)
