"""What a distillation stage is told (``DistillConfig``) and what it reports (``DistillResult``).

Kept apart from ``converters.distill`` so that the registry, recipes and the codec can read the
config without importing torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxforge.converters._isolation import SOURCE_TIMEOUT_S
from onnxforge.errors import CalibrationDataError, UsageError
from onnxforge.pipeline.codec import JsonResult, option
from onnxforge.pipeline.data_spec import DataSpec, set_data_fields
from onnxforge.pipeline.evaluate import Metric

__all__ = ["DistillConfig", "DistillLoss", "DistillResult"]


class DistillLoss(enum.Enum):
    AUTO = "auto"  # KL with labels or class scores; cosine for unit-norm embeddings; else MSE
    KL = "kl"  # KL divergence of temperature-softened class distributions (times T^2)
    MSE = "mse"  # mean squared error of the outputs
    COSINE = "cosine"  # 1 - cosine similarity of the outputs (embeddings)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """How to train the pruned student against its teacher.

    temperature: softens both class distributions for the KL loss (Hinton et al.: T = 2..8).
    alpha: weight of the cross-entropy on labels, mixed in when the calibration data has a
      ``label`` array (loss = (1 - alpha) * distillation + alpha * CE); ignored without labels.
    feature_weight: weight of the intermediate-feature term, an MSE (normalized by the teacher
      feature's variance) at the output of every layer the pruning cut, on the channels it kept.
    mixup: inputs mixed pairwise, x = l x_i + (1 - l) x_j with l ~ Beta(mixup, mixup), and labelled by
      the teacher: more distinct training points from few samples (0: off; float inputs only).
    held_out: share of the calibration samples kept out of training, for early stopping.
    patience: epochs without a better held-out score before training stops.
    time_budget_s: training stops at the end of the batch that runs past it (None: no limit).
    timeout_s: a ``file.py:callable`` teacher is the user's code: the whole distillation runs in a
      child process, stopped (exit 2) after this many seconds; not part of the cache key.
    calibration_data: the training samples (the recipe's ``calibration``); eval_data, metric and
      tolerance: the gate against the teacher on held-out data, as in the other stages.
    """

    loss: DistillLoss = option(
        DistillLoss.AUTO, help="the training loss (auto: KL on softened logits for classifiers, MSE/cosine otherwise)"
    )
    temperature: float = option(4.0, help="softmax temperature of the KL loss")
    alpha: float = option(0.5, help="weight of the cross-entropy on labels, when the calibration data has labels")
    feature_weight: float = option(0.0, help="weight of the intermediate-feature (MSE) term")
    mixup: float = option(0.0, help="mixup strength of the training inputs (0: off)")
    epochs: int = option(30, help="training epochs (early stopping may end sooner)")
    batch_size: int = option(64, help="training batch size")
    learning_rate: float = option(1e-3, help="learning rate")
    seed: int = option(0, help="random seed")
    held_out: float = option(0.1, help="share of the calibration samples kept out of training, for early stopping")
    patience: int = option(6, help="epochs without a better held-out score before training stops")
    time_budget_s: float | None = option(None, help="seconds of training at most (none: no limit)")
    timeout_s: float = option(
        SOURCE_TIMEOUT_S,
        help="a file.py:callable teacher runs in a child process; stop the distillation after this many seconds",
        key=False,
    )
    calibration_data: DataSpec | None = None
    eval_data: DataSpec | None = None
    metric: Metric = Metric.AUTO
    tolerance: float | None = None

    def __post_init__(self) -> None:
        set_data_fields(self, "calibration_data", "eval_data")  # a str or Path from the Python API becomes a DataSpec
        if self.temperature <= 0:
            raise UsageError(f"distill: temperature {self.temperature:g} must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"distill: alpha {self.alpha:g} must be in [0, 1]")
        if self.feature_weight < 0:
            raise UsageError(f"distill: feature_weight {self.feature_weight:g} must be >= 0")
        if self.mixup < 0:
            raise UsageError(f"distill: mixup {self.mixup:g} must be >= 0")
        if self.epochs < 0 or self.batch_size < 1 or self.patience < 1:
            raise UsageError("distill: epochs must be >= 0, batch_size and patience >= 1")
        if self.learning_rate <= 0:
            raise UsageError(f"distill: learning_rate {self.learning_rate:g} must be positive")
        if not 0.0 < self.held_out < 1.0:
            raise UsageError(f"distill: held_out {self.held_out:g} must be in (0, 1)")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise UsageError(f"distill: time_budget_s {self.time_budget_s:g} must be positive")
        if not self.timeout_s > 0:
            raise UsageError(f"distill: timeout_s {self.timeout_s:g} must be positive")
        if self.time_budget_s is not None and self.time_budget_s >= self.timeout_s:
            raise UsageError(f"distill: a time budget of {self.time_budget_s:g} s does not fit in the timeout of "
                             f"{self.timeout_s:g} s", hint="raise timeout_s (--timeout) above time_budget_s")
        if self.tolerance is not None and self.tolerance < 0:
            raise UsageError(f"distill: tolerance {self.tolerance:g} must be >= 0")

    def require_data(self) -> DataSpec:
        if self.calibration_data is None:
            raise CalibrationDataError("the distill stage trains on calibration data",
                                       hint="set 'calibration' in the recipe, or pass --calibration")
        return self.calibration_data


@dataclass
class DistillResult(JsonResult):
    """What a distillation did and measured.

    parity_before: the student built in PyTorch against the pruned ONNX model, before training
    (max abs error); parity_after: the exported student against the trained PyTorch one.
    held_out_before / held_out_after: the held-out metric of the student before and after training;
    scores: teacher, repair-only (the input ONNX model) and distilled on the eval data.
    history: one entry per epoch (epoch 0: the untrained student): ``epoch``, ``loss`` (mean training
    loss, None at epoch 0), ``held_out`` (the held-out metric), ``held_out_loss`` and ``seconds`` (training
    time at the epoch's end); the run report draws it as the training curve.
    """

    path: Path | None = field(metadata={"json": False})  # where the student went; the stage record names it
    loss: str
    held_out_metric: str
    epochs_run: int
    best_epoch: int
    stopped: str
    train_seconds: float = field(metadata={"json": False})  # saved rounded to the millisecond (json_extra)
    train_samples: int
    held_out_samples: int
    history: list[dict[str, Any]] = field(default_factory=list)
    held_out_before: float | None = None
    held_out_after: float | None = None
    parity_before: dict[str, Any] = field(default_factory=dict)
    parity_after: dict[str, Any] = field(default_factory=dict)
    mapping: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    gate: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return bool(self.parity_after.get("ok"))

    def json_extra(self) -> dict[str, Any]:
        return {"train_seconds": round(self.train_seconds, 3), "verified": self.verified}
