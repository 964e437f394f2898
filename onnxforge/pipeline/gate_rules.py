"""The rules a quality gate applies to a candidate's outputs, beside its metric's mean: what a task sees.

A mean hides what a user notices (issue 23: a CNN within -1 point of accuracy whose predictions
changed on 19% of samples; an OCR model at mean cosine 0.99 that misread 4 more captchas of 32).
``judge`` applies, to the first output:

- **The metric** (``QualityGate.passes``): the measured change must be within the tolerance; a drop
  is never forgiven as noise (exit 0 means the user's data kept its quality). For accuracy the line
  also gives the drop's sampling error, so a user sees how much the eval set can tell: the normal
  approximation of the paired difference ``d_i = correct_candidate_i - correct_input_i`` (McNemar's
  setting), ``mean(d) +- 1.96 * sd(d) / sqrt(n)``, in points. A failed drop whose interval still
  reaches the allowed change says "within noise: more eval samples would tell".
- **Churn** (accuracy): the share of samples whose top-1 class differs from the input model's may be
  at most ``max_churn`` points: two models with the same accuracy that disagree on a fifth of the
  samples are not the same model to a user.
- **The worst sample** (mean cosine): the lowest per-sample cosine must stay at or above
  ``worst_cosine``.
- **Per-position agreement** (a sequence of class scores ``[N, T, C]`` under cosine, min-cosine or
  rel-error): the share of (sample, position) pairs whose argmax over ``C`` equals the input's must be
  at least ``100 - max_churn`` percent. An output is taken for such a sequence when it is 3-D with
  ``C > 1`` and, along its last axis, a distribution (non-negative, summing to 1: softmax) or a
  log-distribution (logsumexp 0: log-softmax), as CTC heads give. Raw scores are taken for one when the
  graph computes them with a linear layer (``output_heads.is_linear_head``: a CTC head without its softmax,
  like ddddocr's captcha reader, ``Gemm -> Reshape`` to ``[T, 1, 8210]``) and one class is the top class
  on at least half the positions but not on all (CTC's blank: 84% of the captcha reader's frames); a
  low-rank reader at mean cosine 0.990 read 16 of 32 captchas against the input's 30 and passed the cosine
  gate. Other raw scores are not recognized: name ``--metric position-agreement`` for them.
- **Class ids** (an integer output: a model whose argmax is in its graph, like a captcha reader that
  returns ``[1, T]`` character ids): ``auto`` compares the ids themselves, never their argmax (which is
  always 0 for one id): top-1 agreement, or accuracy with labels, for one id per sample; for more, the
  share of positions whose id is the input's (``position-agreement``) and the decoded sequences.
- **Decoded sequences** (the same outputs, and ``--metric position-agreement``): what a task reads from
  such an output is its decoded sequence, not its positions: a CTC line shifted by one frame reads the
  same, one changed character is a misread line that a 99.9% per-position agreement hides (issue 23: a
  low-rank recognizer at 48 of 50 lines against the input's 49 passed). Each sample's argmax sequence is
  decoded the CTC way (runs of a class merged, the blank dropped; the blank is the class the input model
  predicts most often, as CTC's blank dominates its frames); the share of samples whose decoded
  sequence differs from the input's may be at most ``sequence_churn`` points: 0 unless ``max_churn`` is
  given, as a changed line is a changed task result. A user metric that reads the task itself is how a
  user allows some.
- A user metric (file.py:function) is the user's rule alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxforge.pipeline import codec
from onnxforge.pipeline.evaluate import Metric, QualityGate

__all__ = ["GateVerdict", "are_ids", "decoded_sequences", "is_class_sequence", "judge",
           "paired_interval", "position_agreement", "predicted_classes", "sample_cosines", "sequence_changes"]

Z_95 = 1.959964


@dataclass(frozen=True)
class GateVerdict(codec.JsonResult):
    """A candidate judged by every rule of its gate: its metric ``value``, whether it ``passed``, each
    rule's line (``checks``) and the ones that failed (``failures``); the numbers behind them."""

    value: float
    passed: bool
    checks: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()
    churn: float | None = None  # share of predictions (samples, or positions) whose top-1 changed
    worst_cosine: float | None = None
    interval: tuple[float, float] | None = None  # 95% CI of the accuracy difference, in points
    sequence_churn: float | None = None  # share of samples whose decoded sequence changed

    def message(self) -> str:
        """Every rule's line, the failed ones first: 'accuracy -1.0 points, 95% CI [-2.3, +0.3] ... FAILED; ...'."""
        rest = [c for c in self.checks if c not in self.failures]
        return "; ".join([*self.failures, *rest])


def _flat_rows(output: np.ndarray) -> list[np.ndarray]:
    if output.dtype == object:
        return [np.asarray(r, dtype=np.float64).reshape(-1) for r in output]
    return list(output.reshape(len(output), -1).astype(np.float64))


def sample_cosines(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each sample's cosine similarity of the flattened output to the reference's."""
    if output.dtype != object and reference.dtype != object:
        y = output.reshape(len(output), -1).astype(np.float64)
        r = reference.reshape(len(reference), -1).astype(np.float64)
        return (y * r).sum(1) / np.maximum(np.linalg.norm(y, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    return np.array([float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
                     for a, b in zip(_flat_rows(output), _flat_rows(reference), strict=True)])


def are_ids(output: np.ndarray) -> bool:
    """Whether ``output`` holds integer class ids (a model with its argmax in the graph), not scores."""
    first = output[0] if output.dtype == object and len(output) else output
    return np.asarray(first).dtype.kind in "iub"


def predicted_classes(output: np.ndarray) -> np.ndarray:
    """Each sample's class: its id when the output is one integer id per sample, else the argmax of its scores."""
    if are_ids(output) and output.dtype != object and math.prod(output.shape[1:]) == 1:
        return output.reshape(-1).astype(np.int64)
    return np.array([int(np.argmax(r)) for r in _flat_rows(output)], dtype=np.int64)


def _positions(output: np.ndarray) -> list[np.ndarray]:
    """Per sample, the class at every position: the ids of an id output, else the argmax over the last axis."""
    if are_ids(output):
        return [np.asarray(r).reshape(-1) for r in output]
    return [np.asarray(r).reshape(-1, np.asarray(r).shape[-1]).argmax(-1) for r in output]


def position_agreement(output: np.ndarray, reference: np.ndarray) -> float:
    """Share of (sample, position) pairs whose class (``_positions``) equals the reference's."""
    if output.dtype != object and reference.dtype != object and output.shape == reference.shape:
        if are_ids(reference):
            return float((output == reference).mean()) if output.size else 1.0
        return float((output.argmax(-1) == reference.argmax(-1)).mean()) if output.size else 1.0
    same = [a == b if a.shape == b.shape else np.zeros(max(len(a), len(b)), bool)
            for a, b in zip(_positions(output), _positions(reference), strict=True)]
    total = sum(len(s) for s in same)
    return float(sum(int(s.sum()) for s in same) / total) if total else 1.0


def decoded_sequences(output: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """Each sample's argmax sequence decoded the CTC way: runs of one class merged, ``blank`` dropped."""
    decoded = []
    for positions in _positions(output):
        runs = positions[np.r_[True, positions[1:] != positions[:-1]]] if len(positions) else positions
        decoded.append(tuple(int(c) for c in runs if c != blank))
    return decoded


def sequence_changes(output: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose decoded sequence (``decoded_sequences``, the blank being the class the
    reference predicts most often) differs from the reference's."""
    ref_positions = _positions(reference)
    if not ref_positions:
        return 0.0
    blank = int(np.bincount(np.concatenate(ref_positions).astype(np.int64)).argmax())
    changed = [a != b for a, b in zip(decoded_sequences(output, blank), decoded_sequences(reference, blank),
                                      strict=True)]
    return float(np.mean(changed))


def is_class_sequence(output: np.ndarray, *, linear_head: bool = False) -> bool:
    """Whether ``output`` is a sequence of classes: scores ``[N, T, C]`` (per sample ``[T, C]`` when
    ragged), C > 1, a distribution or log-distribution along C, or, when the graph computes them with a
    linear layer (``linear_head``), raw scores whose most frequent top class (a blank) tops at least half
    the positions but not all (see the module doc); or integer ids with more than one per sample
    (``[N, T]``: a CTC head decoded in the graph)."""
    if are_ids(output):
        return all(np.size(r) > 1 for r in output) if output.dtype == object else math.prod(output.shape[1:]) > 1
    rows = list(output) if output.dtype == object else None
    if rows is None and (output.ndim != 3 or output.shape[-1] < 2):
        return False
    if rows is not None and not all(np.ndim(r) == 2 and np.shape(r)[-1] > 1 for r in rows):
        return False
    values = (np.concatenate([np.asarray(r, dtype=np.float64) for r in rows]) if rows is not None
              else np.asarray(output[:64], dtype=np.float64).reshape(-1, output.shape[-1]))
    if values.size == 0 or not np.isfinite(values).all():
        return False
    if values.min() >= -1e-4 and np.abs(values.sum(-1) - 1.0).max() < 1e-2:
        return True
    top = values.max(-1, keepdims=True)
    logsumexp = top[:, 0] + np.log(np.exp(values - top).sum(-1))
    if values.max() <= 1e-4 and np.abs(logsumexp).max() < 1e-2:
        return True
    if not linear_head or len(values) < 2 * min(len(output), 64):  # [N, 1, C]: one class per sample, no sequence
        return False
    blank_share = np.bincount(values.argmax(-1)).max() / len(values)
    return bool(0.5 <= blank_share < 1.0)


def paired_interval(candidate_correct: np.ndarray, reference_correct: np.ndarray) -> tuple[float, float]:
    """95% interval of the accuracy difference (candidate - reference) in points, from the paired per-sample
    differences (normal approximation: McNemar's setting)."""
    d = candidate_correct.astype(np.float64) - reference_correct.astype(np.float64)
    n = len(d)
    if n == 0:
        return 0.0, 0.0
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 1.0
    half = Z_95 * sd / math.sqrt(n)
    return (mean - half) * 100.0, (mean + half) * 100.0


def judge(gate: QualityGate, outputs: list[np.ndarray], reference: list[np.ndarray], labels: np.ndarray | None,
          value: float, reference_value: float) -> GateVerdict:
    """``value`` (the metric of ``outputs``) and every other rule of ``gate`` against the input model's
    ``reference`` outputs (and ``labels``), as a GateVerdict."""
    checks: list[str] = []
    failures: list[str] = []
    found: dict = {}

    def rule(text: str, ok: bool) -> None:
        line = text if ok else text + " FAILED"
        checks.append(line)
        if not ok:
            failures.append(line)

    main_ok = gate.passes(value, reference_value)
    first, ref_first = outputs[0], reference[0]
    if gate.metric is Metric.ACCURACY and labels is not None:
        labels = np.asarray(labels).reshape(-1)
        top, ref_top = predicted_classes(first), predicted_classes(ref_first)
        low, high = paired_interval(top == labels, ref_top == labels)
        found["interval"] = (round(low, 3), round(high, 3))
        within_noise = high >= -gate.tolerance  # the interval reaches an allowed change
        change = (value - reference_value) * 100.0
        rule(f"accuracy {change:+.1f} points, 95% CI [{low:+.1f}, {high:+.1f}]"
             + (" (within noise: more eval samples would tell)" if within_noise and not main_ok else "")
             + f" (allowed: -{gate.tolerance:g})", main_ok)
        churn = float((top != ref_top).mean()) if len(top) else 0.0
        found["churn"] = churn
        rule(f"predictions changed on {churn * 100:.1f}% of samples (allowed: {gate.max_churn:g}%)",
             churn * 100.0 <= gate.max_churn + 1e-9)
    else:
        rule(f"{gate.name} {gate.format(value)} ({gate.describe().split('; ')[0]})", main_ok)
        if gate.metric in (Metric.AGREEMENT, Metric.POSITION_AGREEMENT):
            found["churn"] = 1.0 - value
    if gate.metric is Metric.COSINE:
        worst = float(sample_cosines(first, ref_first).min()) if len(first) else 1.0
        found["worst_cosine"] = worst
        rule(f"worst sample's cosine {worst:.4f} (allowed: >= {gate.worst_cosine:g})",
             worst >= gate.worst_cosine - 1e-12)
    if gate.checks_positions:
        agree = position_agreement(first, ref_first)
        found["churn"] = 1.0 - agree
        rule(f"per-position top-1 agreement {agree * 100:.1f}% (allowed: >= {100 - gate.max_churn:g}%)",
             (1.0 - agree) * 100.0 <= gate.max_churn + 1e-9)
    if gate.checks_sequences:
        changed = sequence_changes(first, ref_first)
        found["sequence_churn"] = changed
        count = round(changed * len(first))
        rule(f"decoded sequences changed on {count} of {len(first)} samples ({changed * 100:.1f}%; allowed: "
             f"<= {gate.sequence_churn:g}%)", changed * 100.0 <= gate.sequence_churn + 1e-9)
    return GateVerdict(value, not failures, tuple(checks), tuple(failures), **found)

