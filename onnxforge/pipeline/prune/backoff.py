"""Back-off against a quality gate, shared by the prune stages (channels, magnitude, low rank).

Rule: try the requested strength; while the result misses the quality gate, lower the strength
(``shrink``: x0.75 for a channel ratio, a sparsity or a rank ratio; more kept energy for low rank)
and try again, until the gate holds or the strength reaches its floor. The first result that passes
(the strongest one that does) is kept; when none does, the first one tried is returned with
``passed`` False, and the stage saves its input model and raises QualityGateError. Without
evaluation data there is no gate and the first try passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import onnx

from onnxforge.model_io import input_specs
from onnxforge.pipeline.calibration import SampleSet, model_batch_size
from onnxforge.pipeline.evaluate import QualityBaseline, QualityGate, run_outputs, score
from onnxforge.targets import get_target
from onnxforge.targets.base import Target

__all__ = ["BackOff", "QualityCheck", "back_off", "shrink"]

Strength = TypeVar("Strength")
Outcome = TypeVar("Outcome")


@dataclass
class QualityCheck:
    """A prune stage's quality gate: the input model's score on the evaluation data, and how to score a
    candidate the same way. ``baseline`` is None without evaluation data: nothing is scored, all passes."""

    target: Target
    batch: int
    baseline: QualityBaseline | None = None

    @classmethod
    def measure(cls, model: onnx.ModelProto, config) -> QualityCheck:
        """Score ``model`` on ``config.eval_data`` (when set) with ``config``'s metric, tolerance and target."""
        target = get_target(config.target)
        batch = model_batch_size(input_specs(model), preferred=32)
        baseline = None
        if config.eval_data is not None:
            baseline = QualityBaseline.measure(model, config.eval_data, config.metric, config.tolerance, target)
        return cls(target, batch, baseline)

    @property
    def samples(self) -> SampleSet | None:
        return self.baseline.samples if self.baseline else None

    @property
    def gate(self) -> QualityGate | None:
        return self.baseline.gate if self.baseline else None

    @property
    def reference_score(self) -> float | None:
        return self.baseline.score if self.baseline else None

    def describe(self) -> str | None:
        return self.baseline.gate.describe() if self.baseline else None

    def score(self, candidate: onnx.ModelProto | bytes) -> float | None:
        """``candidate``'s score on the evaluation data on the target; None without evaluation data."""
        if self.baseline is None:
            return None
        data = candidate if isinstance(candidate, bytes) else candidate.SerializeToString()
        outputs = run_outputs(self.target.session(data), self.baseline.samples, self.batch)
        return score(self.baseline.gate.metric, outputs, self.baseline.reference, self.baseline.samples.labels)

    def passes(self, value: float | None) -> bool:
        return self.baseline is None or self.baseline.gate.passes(value, self.baseline.score)


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
