"""The quality gate's fields, declared once: every stage that gates its output on the input model's
(quantize and the three prune methods) inherits ``GateFields``, and the search (``OptimizeConfig``, whose
eval data is required) inherits its rules, ``GateRules``; so the fields' names, defaults, help, CLI
spellings and recipe keys are the same everywhere. A ``QualityGate`` (onnxforge.pipeline.evaluate) is
resolved from them through a ``Reference`` (onnxforge.pipeline.reference)."""

from __future__ import annotations

from dataclasses import dataclass

from onnxforge.pipeline.codec import option
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import MAX_CHURN_HELP, METRIC_HELP, WORST_COSINE_HELP, Metric
from onnxforge.pipeline.user_metric import UserMetric

__all__ = ["GateFields", "GateRules"]


@dataclass(frozen=True, kw_only=True)
class GateRules:
    """What a quality gate allows: its metric and tolerance (None: the metric's default) and its other
    rules (None: their defaults, which never undercut a looser tolerance: QualityGate.resolve)."""

    metric: UserMetric | Metric = option(Metric.AUTO, help=METRIC_HELP)
    tolerance: float | None = option(None, help="the quality gate, in the metric's unit")
    max_churn: float | None = option(None, help=MAX_CHURN_HELP)
    worst_cosine: float | None = option(None, help=WORST_COSINE_HELP)


@dataclass(frozen=True, kw_only=True)
class GateFields(GateRules):
    """A stage's gate: its rules and the samples it scores. A config inheriting it turns a str or Path
    ``eval_data`` into a DataSpec in its own ``__post_init__`` (data_spec.set_data_fields)."""

    eval_data: DataSpec | None = option(
        None,
        help="held-out samples the quality gate scores against the input model (default: a share of the "
        "calibration samples, where the stage takes them)",
    )
