"""Back-off against a quality gate, shared by the prune stages (channels, magnitude, low rank).

Rule: try the requested strength; while the result misses the quality gate, lower the strength
(``shrink``: x0.75 for a channel ratio, a sparsity or a rank ratio; more kept energy for low rank)
and try again, until the gate holds or the strength reaches its floor. The first result that passes
(the strongest one that does) is kept; when none does, the first one tried is returned with
``passed`` False, and the stage saves its input model and raises QualityGateError with every
try's numbers. The gate is measured on the eval data, else on held-out calibration samples
(onnxforge.pipeline.prune.checks); without either there is no gate, the first try passes, and the
result says that quality was not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

from onnxforge.pipeline.prune.checks import QualityCheck

__all__ = ["BackOff", "QualityCheck", "back_off", "shrink"]

Strength = TypeVar("Strength")
Outcome = TypeVar("Outcome")


class BackOff(NamedTuple, Generic[Outcome]):
    outcome: Outcome  # the first passing try, else the first try
    passed: bool
    last: object  # the strength tried last


def back_off(
    start: Strength,
    attempt: Callable[[Strength], tuple[Outcome, bool]],
    lower: Callable[[Strength, Outcome], Strength | None],
) -> BackOff[Outcome]:
    """``attempt(strength)`` -> (outcome, passes), from ``start``; while it fails, ``lower(strength, outcome)``
    gives the next strength, or None to stop."""
    first: tuple[Outcome] | None = None
    strength = start
    while True:
        outcome, passes = attempt(strength)
        if passes:
            return BackOff(outcome, True, strength)
        if first is None:
            first = (outcome,)
        lowered = lower(strength, outcome)
        if lowered is None:
            return BackOff(first[0], False, strength)
        strength = lowered


def shrink(value: float, factor: float = 0.75, floor: float = 0.05) -> float | None:
    """``value * factor``, or None (stop) when that falls under ``floor``."""
    lowered = value * factor
    return None if lowered < floor else lowered
