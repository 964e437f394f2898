"""Coarse-then-fine scoring: every candidate is ranked on a subset of the held-out samples, and only
the ones that can still be kept are scored on all of them.

Rule. With at least ``2 * COARSE_MIN`` held-out samples, each candidate is first scored on the first
``max(COARSE_MIN, n // 4)`` (Reference.head: the same gate, the reference outputs sliced). After timing, the
candidates that pass on that subset are scored on every sample in order of their p50, fastest first,
until one passes there too; the ones inside the timing tie band of it are scored too (a tie goes to
the better score, which must be the full one). A candidate slower than that, or failing on the subset,
can never be kept, so its subset score stands (``scored_samples`` says so). A re-timing that makes
a subset-scored candidate the fastest again calls ``refine`` again: no candidate is kept on a subset
score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from onnxforge.pipeline.quantize.config import CandidateResult

__all__ = ["COARSE_MIN", "coarse_count", "refine"]

COARSE_MIN = 32  # samples a coarse score is taken on at least: a cosine or accuracy on fewer is too noisy


def coarse_count(held_out: int) -> int | None:
    """Samples to rank candidates on, or None when the held-out set is too small to split."""
    if held_out < 2 * COARSE_MIN:
        return None
    return max(COARSE_MIN, held_out // 4)


def refine(
    candidates: Sequence[CandidateResult],
    score_all: Callable[[CandidateResult], tuple[float, bool]],
    tie_fraction: float,
) -> int:
    """Score on all samples (``score_all``: (score, meets tolerance)) the subset-scored candidates that
    could be kept, fastest first (see the module doc); returns how many were scored now."""
    timed = sorted((c for c in candidates if c.latency is not None and c.meets_tolerance),
                   key=lambda c: c.latency.p50_ms if c.latency else 0.0)
    scored = 0
    band: float | None = None
    for c in timed:
        p50 = c.latency.p50_ms if c.latency else 0.0
        if band is not None and p50 > band:
            break
        if c.scored_samples is not None:
            c.score, c.meets_tolerance = score_all(c)
            c.scored_samples = None
            scored += 1
        if c.meets_tolerance and band is None:
            band = p50 * (1.0 + tie_fraction)
    return scored
