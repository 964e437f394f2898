"""The quality gate's fields, declared once: every stage that gates its output on the input model's
(quantize and the three prune methods) inherits ``GateFields``, so the fields' names, defaults, help,
CLI spellings and recipe keys are the same everywhere. A ``QualityGate`` (onnxforge.pipeline.evaluate)
is built from them through a ``Reference`` (onnxforge.pipeline.reference)."""

from __future__ import annotations

from dataclasses import dataclass

from onnxforge.pipeline.codec import option
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import MAX_CHURN_HELP, METRIC_HELP, WORST_COSINE_HELP, Metric
from onnxforge.pipeline.user_metric import UserMetric

__all__ = ["GateFields"]


@dataclass(frozen=True, kw_only=True)
class GateFields:
    """What a stage's quality gate measures and allows. A config inheriting it turns a str or Path
    ``eval_data`` into a DataSpec in its own ``__post_init__`` (data_spec.set_data_fields)."""

    eval_data: DataSpec | None = option(
        None,
        help="held-out samples the quality gate scores against the input model (default: a share of the "
        "calibration samples, where the stage takes them)",
    )
    metric: UserMetric | Metric = option(Metric.AUTO, help=METRIC_HELP)
    tolerance: float | None = option(None, help="the quality gate, in the metric's unit")
    max_churn: float | None = option(None, help=MAX_CHURN_HELP)
    worst_cosine: float | None = option(None, help=WORST_COSINE_HELP)
