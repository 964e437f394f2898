"""Quality metrics of a candidate model against the fp32 reference (and labels, when given).

- ``accuracy``: top-1 accuracy against labels; the tolerance is the allowed drop in points.
- ``agreement``: share of samples whose top-1 class equals the reference's; tolerance = allowed
  disagreement in points.
- ``cosine``: mean cosine similarity of the first output to the reference's; tolerance = minimum.
- ``min-cosine``: the worst sample's cosine similarity; tolerance = minimum (a gate on every sample,
  e.g. "every sentence embedding within 0.99", which a mean can hide).
- ``rel-error``: mean over samples of ||y - y_ref|| / ||y_ref||; tolerance = maximum.
``auto`` picks accuracy with labels, agreement for a (N, classes) output, else cosine.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from onnxforge.pipeline.calibration import SampleSet

__all__ = ["Metric", "QualityGate", "resolve_metric", "run_outputs", "score", "tolerance_help"]

T = TypeVar("T")


class Metric(enum.Enum):
    AUTO = "auto"
    ACCURACY = "accuracy"
    AGREEMENT = "agreement"
    COSINE = "cosine"
    MIN_COSINE = "min-cosine"
    REL_ERROR = "rel-error"


_DEFAULT_TOLERANCE = {
    Metric.ACCURACY: 0.5,  # points of accuracy lost
    Metric.AGREEMENT: 1.0,  # points of top-1 disagreement
    Metric.COSINE: 0.99,  # minimum mean cosine
    Metric.MIN_COSINE: 0.99,  # minimum cosine of the worst sample
    Metric.REL_ERROR: 0.05,  # maximum mean relative error
}
# One spelling of the tolerance per metric, in the metric's own unit (what --tolerance means).
_TOLERANCE_UNIT = {
    Metric.ACCURACY: "points of accuracy the candidate may lose (at most)",
    Metric.AGREEMENT: "points of top-1 disagreement with the reference (at most)",
    Metric.COSINE: "minimum mean cosine similarity to the reference",
    Metric.MIN_COSINE: "minimum cosine similarity of every sample to the reference",
    Metric.REL_ERROR: "maximum mean relative error to the reference",
}
_HIGHER_IS_BETTER = {Metric.ACCURACY: True, Metric.AGREEMENT: True, Metric.COSINE: True, Metric.MIN_COSINE: True,
                     Metric.REL_ERROR: False}


@dataclass(frozen=True, kw_only=True)
class QualityGate:
    """A resolved metric with its tolerance; ``passes`` compares a candidate score to the reference's."""

    metric: Metric
    tolerance: float

    @classmethod
    def resolve(cls, metric: Metric, tolerance: float | None, has_labels: bool, output_shape: tuple) -> QualityGate:
        chosen = resolve_metric(metric, has_labels, output_shape)
        return cls(metric=chosen, tolerance=_DEFAULT_TOLERANCE[chosen] if tolerance is None else float(tolerance))

    @property
    def higher_is_better(self) -> bool:
        return _HIGHER_IS_BETTER[self.metric]

    @property
    def unit(self) -> str:
        """What the tolerance is measured in: a drop in points (accuracy, agreement), a minimum
        (cosine, min-cosine) or a maximum (rel-error)."""
        return _TOLERANCE_UNIT[self.metric]

    def describe_tolerance(self) -> str:
        """The tolerance with its unit, e.g. ``0.5 (points of accuracy the candidate may lose (at most))``."""
        return f"{self.tolerance:g} ({self.unit})"

    def best(self, items: Iterable[T], score: Callable[[T], float]) -> T | None:
        """The item whose ``score`` is best under this metric (highest, or lowest for rel-error); None if none."""
        sign = 1.0 if self.higher_is_better else -1.0
        return max(items, key=lambda item: sign * score(item), default=None)

    def passes(self, candidate: float, reference: float) -> bool:
        if self.metric is Metric.ACCURACY:
            return (reference - candidate) * 100.0 <= self.tolerance + 1e-9
        if self.metric is Metric.AGREEMENT:
            return (1.0 - candidate) * 100.0 <= self.tolerance + 1e-9
        if self.metric in (Metric.COSINE, Metric.MIN_COSINE):
            return candidate >= self.tolerance
        return candidate <= self.tolerance

    def describe(self) -> str:
        return {
            Metric.ACCURACY: f"accuracy drop <= {self.tolerance:g} points",
            Metric.AGREEMENT: f"top-1 agreement with fp32 >= {100 - self.tolerance:g}%",
            Metric.COSINE: f"mean cosine to fp32 >= {self.tolerance:g}",
            Metric.MIN_COSINE: f"every sample's cosine to fp32 >= {self.tolerance:g}",
            Metric.REL_ERROR: f"mean relative error to fp32 <= {self.tolerance:g}",
        }[self.metric]

    def format(self, value: float) -> str:
        if self.metric in (Metric.ACCURACY, Metric.AGREEMENT):
            return f"{value * 100:.2f}%"
        return f"{value:.4f}"


def tolerance_help() -> str:
    """What a tolerance means for each metric, in its unit: for help texts."""
    return "; ".join(f"{metric.value}: {unit}, default {_DEFAULT_TOLERANCE[metric]:g}"
                     for metric, unit in _TOLERANCE_UNIT.items())


def resolve_metric(metric: Metric, has_labels: bool, output_shape: tuple) -> Metric:
    if metric is not Metric.AUTO:
        return metric
    if has_labels:
        return Metric.ACCURACY
    if len(output_shape) == 2 and output_shape[1] > 1:
        return Metric.AGREEMENT
    return Metric.COSINE


def run_outputs(session: ort.InferenceSession, samples: SampleSet, batch_size: int) -> list[np.ndarray]:
    """All outputs of ``session`` over ``samples``, in sample order.

    For a ragged set (variable-length inputs, fed in equal-shape groups) an output whose
    per-sample shapes differ is returned as an object array of per-sample arrays.
    """
    placed: list[tuple[np.ndarray, list[np.ndarray]]] = []
    feeding = samples.feeding
    fixed_batch = any(isinstance(i.shape[feeding.batch_axes.get(i.name, 0)], int)
                      for i in session.get_inputs() if i.shape and i.name not in feeding.constants)
    for index, batch in samples.indexed_batches(batch_size):
        n = len(index)
        if n < batch_size and fixed_batch:
            # fixed-batch models: pad the batch and drop the padding from the outputs
            outputs = session.run(None, feeding.resized(batch, batch_size))
            placed.append((index, [_per_sample(o, batch_size)[:n] for o in outputs]))
        else:
            placed.append((index, [_per_sample(o, n) for o in session.run(None, batch)]))
    if not placed:
        return []
    if not samples.is_ragged:
        return [np.concatenate([c[i] for _, c in placed]) for i in range(len(placed[0][1]))]
    outputs = []
    for i in range(len(placed[0][1])):
        rows: list[np.ndarray | None] = [None] * len(samples)
        for index, chunk in placed:
            for j, sample in enumerate(index):
                rows[int(sample)] = chunk[i][j]
        filled = [r for r in rows if r is not None]  # every sample is in one chunk: all rows are set
        if len({r.shape for r in filled}) == 1:
            outputs.append(np.stack(filled))
        else:
            ragged = np.empty(len(rows), dtype=object)
            for j, r in enumerate(rows):
                ragged[j] = r
            outputs.append(ragged)
    return outputs


def _per_sample(output: np.ndarray, n: int) -> np.ndarray:
    """``output`` with its batch axis first: axis 0 when it holds the batch's ``n`` samples, else the first
    axis that does (a recurrent state's ``[layers, batch, hidden]``)."""
    if output.ndim == 0 or output.shape[0] == n:
        return output
    axis = next((a for a, d in enumerate(output.shape) if d == n), 0)
    return np.moveaxis(output, axis, 0)


def _rows(output: np.ndarray) -> list[np.ndarray] | np.ndarray:
    if output.dtype == object:
        return [np.asarray(r, dtype=np.float64).reshape(-1) for r in output]
    return output.reshape(len(output), -1).astype(np.float64)


def score(metric: Metric, outputs: list[np.ndarray], reference: list[np.ndarray], labels: np.ndarray | None) -> float:
    """The metric of ``outputs`` (first output) against labels or the reference outputs.

    Per sample, on the flattened first output; then the mean over samples (the minimum for
    ``min-cosine``). Ragged outputs
    (variable-length samples) are compared sample by sample.
    """
    y, ref = _rows(outputs[0]), _rows(reference[0])
    if isinstance(y, np.ndarray) and isinstance(ref, np.ndarray):
        if metric is Metric.ACCURACY:
            if labels is None:
                raise ValueError("accuracy needs labels")
            return float((y.argmax(1) == labels).mean())
        if metric is Metric.AGREEMENT:
            return float((y.argmax(1) == ref.argmax(1)).mean())
        if metric in (Metric.COSINE, Metric.MIN_COSINE):
            den = np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1)
            cosines = (y * ref).sum(1) / np.maximum(den, 1e-12)
            return float(np.mean(cosines) if metric is Metric.COSINE else np.min(cosines))
        if metric is Metric.REL_ERROR:
            return float(np.mean(np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)))
        raise ValueError(f"unresolved metric {metric}")
    if metric is Metric.ACCURACY:
        if labels is None:
            raise ValueError("accuracy needs labels")
        return float(np.mean([int(np.argmax(r)) == int(lab) for r, lab in zip(y, labels, strict=False)]))
    if metric is Metric.AGREEMENT:
        return float(np.mean([int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(y, ref, strict=False)]))
    if metric in (Metric.COSINE, Metric.MIN_COSINE):
        cosines = [float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
                   for a, b in zip(y, ref, strict=False)]
        return float(np.mean(cosines) if metric is Metric.COSINE else np.min(cosines))
    if metric is Metric.REL_ERROR:
        return float(
            np.mean([float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-12)
                     for a, b in zip(y, ref, strict=False)])
        )
    raise ValueError(f"unresolved metric {metric}")
