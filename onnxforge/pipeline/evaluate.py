"""Quality metrics of a candidate model against the fp32 reference (and labels, when given).

- ``accuracy``: top-1 accuracy against labels; the tolerance is the allowed drop in points.
- ``agreement``: share of samples whose top-1 class equals the reference's; tolerance = allowed
  disagreement in points.
- ``position-agreement``: for a sequence of class scores ``[N, T, C]`` (CTC logits), the share of
  (sample, position) pairs whose top-1 class equals the reference's; tolerance = allowed disagreement in points.
- ``cosine``: mean cosine similarity of the first output to the reference's; tolerance = minimum.
- ``min-cosine``: the worst sample's cosine similarity; tolerance = minimum (a gate on every sample,
  e.g. "every sentence embedding within 0.99", which a mean can hide).
- ``rel-error``: mean over samples of ||y - y_ref|| / ||y_ref||; tolerance = maximum.
- ``file.py:function``: the user's own metric (``user_metric``); tolerance = allowed drop in its units.
``auto`` picks accuracy with labels, agreement for a (N, classes) output, else cosine.

The metric is the gate's main rule; ``gate_rules`` adds what a task sees beside it (the worst sample,
churn, the accuracy drop's sampling error, per-position agreement of sequence outputs).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from onnxforge.errors import UsageError
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.user_metric import UserMetric, parse_user_metric

__all__ = ["DEFAULT_MAX_CHURN", "DEFAULT_WORST_COSINE", "MAX_CHURN_HELP", "METRIC_HELP", "WORST_COSINE_HELP",
           "Metric", "QualityGate", "as_metric", "resolve_metric", "run_outputs",
           "score", "set_metric_field", "tolerance_help"]

T = TypeVar("T")


class Metric(enum.Enum):
    AUTO = "auto"
    ACCURACY = "accuracy"
    AGREEMENT = "agreement"
    COSINE = "cosine"
    MIN_COSINE = "min-cosine"
    REL_ERROR = "rel-error"
    POSITION_AGREEMENT = "position-agreement"
    USER = "user"  # a file.py:function metric (UserMetric); spelled by its file, never as "user"


DEFAULT_MAX_CHURN = 5.0  # points of predictions (per sample, or per sequence position) that may change
DEFAULT_WORST_COSINE = 0.95  # the floor of the worst sample's cosine under the (mean) cosine gate
# points of samples whose decoded sequence (a CTC line of text, a box's classes) may read differently: a
# changed line is a changed task result, so none by default; an explicit max_churn sets it too
DEFAULT_SEQUENCE_CHURN = 0.0


_DEFAULT_TOLERANCE = {
    Metric.ACCURACY: 0.5,  # points of accuracy lost
    Metric.AGREEMENT: 1.0,  # points of top-1 disagreement
    Metric.COSINE: 0.99,  # minimum mean cosine
    Metric.MIN_COSINE: 0.99,  # minimum cosine of the worst sample
    Metric.REL_ERROR: 0.05,  # maximum mean relative error
    Metric.POSITION_AGREEMENT: 1.0,  # points of per-position top-1 disagreement
    Metric.USER: 0.0,  # the user metric's own units of drop from the input's score
}
# One spelling of the tolerance per metric, in the metric's own unit (what --tolerance means).
_TOLERANCE_UNIT = {
    Metric.ACCURACY: "points of accuracy the candidate may lose (at most)",
    Metric.AGREEMENT: "points of top-1 disagreement with the reference (at most)",
    Metric.COSINE: "minimum mean cosine similarity to the reference",
    Metric.MIN_COSINE: "minimum cosine similarity of every sample to the reference",
    Metric.REL_ERROR: "maximum mean relative error to the reference",
    Metric.POSITION_AGREEMENT: "points of per-position top-1 disagreement with the reference (at most)",
    Metric.USER: "drop from the input's score allowed, in the metric's own units",
}
_HIGHER_IS_BETTER = {Metric.ACCURACY: True, Metric.AGREEMENT: True, Metric.COSINE: True, Metric.MIN_COSINE: True,
                     Metric.REL_ERROR: False, Metric.POSITION_AGREEMENT: True, Metric.USER: True}


@dataclass(frozen=True, kw_only=True)
class QualityGate:
    """A resolved metric with its tolerance; ``passes`` compares a candidate score to the reference's
    (the main rule alone); ``gate_rules.judge`` applies every rule to a candidate's outputs.

    ``max_churn``: points of predictions (top-1 per sample, or per position of a sequence output) that
    may change from the input model's; ``worst_cosine``: the floor of the worst sample's cosine under
    the cosine gate; ``sequence_churn``: points of samples whose decoded sequence may change;
    ``sequence``: the first output is a sequence of class scores (per-position agreement and decoded
    sequences are checked); ``user``: the file.py:function metric when ``metric`` is USER."""

    metric: Metric
    tolerance: float
    max_churn: float = DEFAULT_MAX_CHURN
    worst_cosine: float = DEFAULT_WORST_COSINE
    sequence_churn: float = DEFAULT_SEQUENCE_CHURN
    sequence: bool = False
    user: UserMetric | None = None

    @classmethod
    def resolve(cls, metric: Metric | UserMetric, tolerance: float | None, has_labels: bool, output_shape: tuple,
                *, ids: bool = False, max_churn: float | None = None, worst_cosine: float | None = None,
                sequence_churn: float | None = None, sequence: bool = False) -> QualityGate:
        user = metric if isinstance(metric, UserMetric) else None
        if metric is Metric.USER:
            raise UsageError("metric 'user' is spelled by its file: file.py:function")
        chosen = Metric.USER if user is not None else resolve_metric(metric, has_labels, output_shape, ids)  # type: ignore[arg-type]
        tolerance = _DEFAULT_TOLERANCE[chosen] if tolerance is None else float(tolerance)
        # the defaults never undercut a looser tolerance the user gave: an accuracy drop of T points
        # changes at least T points of predictions; the worst sample is at most the mean
        if sequence_churn is None:
            sequence_churn = DEFAULT_SEQUENCE_CHURN if max_churn is None else max_churn
        if max_churn is None:
            max_churn = max(DEFAULT_MAX_CHURN, tolerance) if chosen is Metric.ACCURACY else DEFAULT_MAX_CHURN
        if worst_cosine is None:
            worst_cosine = min(DEFAULT_WORST_COSINE, tolerance) if chosen is Metric.COSINE else DEFAULT_WORST_COSINE
        return cls(metric=chosen, tolerance=tolerance, max_churn=float(max_churn), worst_cosine=float(worst_cosine),
                   sequence_churn=float(sequence_churn), sequence=sequence, user=user)

    @property
    def name(self) -> str:
        """The metric as the user wrote it: its name, or file.py:function."""
        return str(self.user) if self.user is not None else self.metric.value

    @property
    def higher_is_better(self) -> bool:
        return _HIGHER_IS_BETTER[self.metric]

    @property
    def unit(self) -> str:
        """What the tolerance is measured in: a drop in points (accuracy, agreement), a minimum
        (cosine, min-cosine) or a maximum (rel-error)."""
        return _TOLERANCE_UNIT[self.metric]

    def relax_hint(self) -> str:
        """What a user may loosen when a candidate misses this gate, in the flags that do it."""
        text = f"loosen --tolerance (now {self.describe_tolerance()})"
        if self.checks_sequences:
            text += (f", let some decoded sequences change with --max-churn (now {self.sequence_churn:g}%), or gate on "
                     "the task itself with --metric file.py:score")
        return text

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
        if self.metric in (Metric.AGREEMENT, Metric.POSITION_AGREEMENT):
            return (1.0 - candidate) * 100.0 <= self.tolerance + 1e-9
        if self.metric is Metric.USER:
            return reference - candidate <= self.tolerance + 1e-9
        if self.metric in (Metric.COSINE, Metric.MIN_COSINE):
            return candidate >= self.tolerance
        return candidate <= self.tolerance

    def describe(self) -> str:
        """Every rule of the gate, as the user reads it (the main rule first; gate_rules.judge applies them)."""
        main = {
            Metric.ACCURACY: f"accuracy drop <= {self.tolerance:g} points",
            Metric.AGREEMENT: f"top-1 agreement with fp32 >= {100 - self.tolerance:g}%",
            Metric.POSITION_AGREEMENT: f"per-position top-1 agreement with fp32 >= {100 - self.tolerance:g}%",
            Metric.COSINE: f"mean cosine to fp32 >= {self.tolerance:g}",
            Metric.MIN_COSINE: f"every sample's cosine to fp32 >= {self.tolerance:g}",
            Metric.REL_ERROR: f"mean relative error to fp32 <= {self.tolerance:g}",
            Metric.USER: f"{self.user} drop from the input's score <= {self.tolerance:g}",
        }[self.metric]
        rules = [main]
        if self.metric is Metric.ACCURACY:
            rules.append(f"predictions changed on <= {self.max_churn:g}% of samples")
        if self.metric is Metric.COSINE:
            rules.append(f"worst sample's cosine >= {self.worst_cosine:g}")
        if self.checks_positions:
            rules.append(f"per-position top-1 agreement >= {100 - self.max_churn:g}%")
        if self.checks_sequences:
            rules.append(f"decoded sequences changed on <= {self.sequence_churn:g}% of samples")
        return "; ".join(rules)

    @property
    def checks_positions(self) -> bool:
        """Whether per-position agreement is a rule beside the metric (a sequence output under cosine,
        min-cosine or rel-error)."""
        return self.sequence and self.metric in (Metric.COSINE, Metric.MIN_COSINE, Metric.REL_ERROR)

    @property
    def checks_sequences(self) -> bool:
        """Whether the decoded sequences are compared with the input's (``gate_rules.sequence_changes``): a
        sequence output under the per-position rule, or the position-agreement metric (which names one)."""
        return self.checks_positions or self.metric is Metric.POSITION_AGREEMENT

    def format(self, value: float) -> str:
        if self.metric in (Metric.ACCURACY, Metric.AGREEMENT, Metric.POSITION_AGREEMENT):
            return f"{value * 100:.2f}%"
        return f"{value:.4f}"


def tolerance_help() -> str:
    """What a tolerance means for each metric, in its unit: for help texts."""
    return "; ".join(f"{'file.py:function' if metric is Metric.USER else metric.value}: {unit}, "
                     f"default {_DEFAULT_TOLERANCE[metric]:g}" for metric, unit in _TOLERANCE_UNIT.items())


def as_metric(value: Metric | UserMetric | str) -> Metric | UserMetric:
    """A config's metric as the Python API may give it: a Metric, a UserMetric, or the text a command
    line takes (a metric's name, or ``file.py:function``, relative to the working folder)."""
    if isinstance(value, (Metric, UserMetric)):
        return value
    if isinstance(value, str):
        user = parse_user_metric(value)
        if user is not None:
            return user
        if value in {m.value for m in Metric if m is not Metric.USER}:
            return Metric(value)
    choices = ", ".join(m.value for m in Metric if m is not Metric.USER)
    raise UsageError(f"metric {value!r}: not one of {choices}, or file.py:function (a user metric)")


def set_metric_field(config: Any) -> None:
    """For a frozen config's ``__post_init__``: its ``metric`` as a Metric or UserMetric (as_metric)."""
    object.__setattr__(config, "metric", as_metric(config.metric))


def resolve_metric(metric: Metric, has_labels: bool, output_shape: tuple, ids: bool = False) -> Metric:
    """AUTO made concrete for an output of ``output_shape`` (integer class ids when ``ids``: a model with its
    argmax inside): a sequence of ids (more than one per sample, as a CTC head decoded in the graph gives)
    is judged per position and by its decoded sequences; one id per sample like class scores."""
    if metric is not Metric.AUTO:
        return metric
    if ids and math.prod(output_shape[1:]) > 1:
        return Metric.POSITION_AGREEMENT
    if has_labels:
        return Metric.ACCURACY
    if ids:
        return Metric.AGREEMENT
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
    ``min-cosine``); ``position-agreement`` per (sample, position). Ragged outputs
    (variable-length samples) are compared sample by sample.
    """
    if metric is Metric.POSITION_AGREEMENT:
        from onnxforge.pipeline.gate_rules import position_agreement

        return position_agreement(outputs[0], reference[0])
    if metric is Metric.USER:
        raise ValueError("a user metric is scored by Reference (in a child process), not here")
    if metric in (Metric.ACCURACY, Metric.AGREEMENT):
        from onnxforge.pipeline.gate_rules import predicted_classes

        predicted = predicted_classes(outputs[0])
        if metric is Metric.AGREEMENT:
            return float((predicted == predicted_classes(reference[0])).mean()) if len(predicted) else 1.0
        if labels is None:
            raise ValueError("accuracy needs labels")
        return float((predicted == np.asarray(labels).reshape(-1)[:len(predicted)]).mean())
    y, ref = _rows(outputs[0]), _rows(reference[0])
    if isinstance(y, np.ndarray) and isinstance(ref, np.ndarray):
        if metric in (Metric.COSINE, Metric.MIN_COSINE):
            den = np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1)
            cosines = (y * ref).sum(1) / np.maximum(den, 1e-12)
            return float(np.mean(cosines) if metric is Metric.COSINE else np.min(cosines))
        if metric is Metric.REL_ERROR:
            return float(np.mean(np.linalg.norm(y - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)))
        raise ValueError(f"unresolved metric {metric}")
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


# ----------------------------------------------------------------------------------------------
# The help of the gate's fields in a stage config: one text for every stage (the CLI flags come from them)

METRIC_HELP = ("quality metric against the input model: auto (accuracy with labels, else top-1 agreement for "
               "class scores, else cosine), a metric's name, or file.py:function (your own score(outputs, labels, "
               "reference) -> float, higher is better; run in a child process)")
MAX_CHURN_HELP = ("points of predictions (top-1 per sample with labels, or per position of a sequence output) that "
                  f"may change from the input model's [default: {DEFAULT_MAX_CHURN:g}, or an accuracy tolerance above "
                  "it]; for a sequence output also the points of samples whose decoded sequence may change "
                  f"[default: {DEFAULT_SEQUENCE_CHURN:g}]")
WORST_COSINE_HELP = ("under the cosine gate, the floor of the worst sample's cosine to the input model's output "
                     f"[default: {DEFAULT_WORST_COSINE:g}, or the mean's tolerance below it]")
