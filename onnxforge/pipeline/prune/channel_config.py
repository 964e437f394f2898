"""The channel-pruning stage's config, its result, and the pruned model the rewrite hands the repair."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxforge.errors import CalibrationDataError, UsageError
from onnxforge.pipeline.codec import JsonResult, option
from onnxforge.pipeline.data_spec import DataSpec, set_data_fields
from onnxforge.pipeline.evaluate import set_metric_field
from onnxforge.pipeline.prune.checks import BackOffFields
from onnxforge.pipeline.prune.importance import Importance

__all__ = ["Allocation", "ChannelPruneConfig", "ChannelPruneResult", "PrunedModel", "Repair"]


class Allocation(enum.Enum):
    UNIFORM = "uniform"  # every group loses the same share of its channels
    SENSITIVITY = "sensitivity"  # groups whose pruning hurts less lose more (scan on calibration data)


class Repair(enum.Enum):
    AUTO = "auto"  # least squares when calibration data is given, else none
    LEAST_SQUARES = "least-squares"
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class ChannelPruneConfig(BackOffFields):
    ratio: float = option(0.5, help="fraction of channels to remove (0: none, with --head-ratio)")
    head_ratio: float = option(
        0.0,
        help="fraction of every attention block's heads to remove, whole heads (transformers, unfused export); "
        "0: none",
    )
    importance: Importance = option(Importance.L2, help="how channels are ranked")
    allocation: Allocation = option(
        Allocation.UNIFORM,
        help="the same ratio for every group, or per-group ratios from a sensitivity scan (needs calibration "
        "data)",
    )
    depth_scales: tuple[float, ...] = option(
        (),
        help="ratio multipliers by depth: N values split the prunable groups into N buckets in graph order (early "
        "first), each group's ratio is multiplied by its bucket's value, then all are scaled back so the total "
        "share removed stays --ratio; none: every group alike",
    )
    repair: Repair = option(
        Repair.AUTO,
        help="refit the next layers by least squares (auto: when calibration data is given)",
    )
    calibration_data: DataSpec | None = option(None, help="samples for the least-squares repair")
    calibration_samples: int = option(256, help="calibration samples fit at most")
    max_samples: int | None = option(  # bounds every use of the data: samples fit and eval samples scored
        None,
        help="bounds every use of the data: samples fit and eval samples scored",
    )
    positions: int = option(  # im2col rows sampled per calibration sample for the repair
        64,
        help="im2col rows sampled per calibration sample for the repair",
    )
    ridge: float = option(1e-3, help="ridge term of the least-squares repair")
    round_to: int | None = option(
        None,
        help="keep channel counts a multiple of this (default: the target's SIMD width, 8 on the CPU: odd counts "
        "ran ~2x slower at the same MACs); 1: no rounding. Layers narrower than it are not rounded",
    )
    exclude_nodes: tuple[str, ...] = option((), help="node names left dense")

    def __post_init__(self) -> None:
        set_data_fields(self, "calibration_data", "eval_data")  # a str or Path from the Python API becomes a DataSpec
        set_metric_field(self)  # and a metric's name or file.py:function a Metric / UserMetric
        if not (0.0 < self.ratio < 1.0 or (self.ratio == 0.0 and self.head_ratio > 0.0)):
            raise UsageError(f"--ratio {self.ratio}: must be in (0, 1), the fraction of channels to remove "
                             "(0 only with --head-ratio)")
        if not 0.0 <= self.head_ratio < 1.0:
            raise UsageError(f"--head-ratio {self.head_ratio}: must be in [0, 1), the fraction of heads to remove")
        if ((self.round_to is not None and self.round_to < 1) or self.calibration_samples < 1 or self.positions < 1
                or (self.max_samples is not None and self.max_samples < 1)):
            raise UsageError("round_to, calibration_samples, max_samples and positions must be at least 1")
        if any(not 0.0 < s <= 4.0 for s in self.depth_scales):
            raise UsageError(f"--depth-scales {', '.join(f'{s:g}' for s in self.depth_scales)}: each must be in "
                             "(0, 4], a multiplier of --ratio")
        if self.ridge < 0:
            raise UsageError(f"ridge {self.ridge}: must be >= 0")
        if self.repair is Repair.LEAST_SQUARES and self.calibration_data is None:
            raise CalibrationDataError(
                "least-squares repair needs calibration data", hint="pass --calibration DATA.npz, or --repair none"
            )
        if self.allocation is Allocation.SENSITIVITY and self.calibration_data is None:
            raise CalibrationDataError(
                "the sensitivity scan needs calibration data",
                hint="pass --calibration DATA.npz, or --allocation uniform",
            )
        if self.importance is Importance.ACTIVATION and self.calibration_data is None:
            raise CalibrationDataError(
                "activation importance needs calibration data", hint="pass --calibration DATA.npz, or use l2"
            )

    @property
    def repairs(self) -> bool:
        return self.repair is not Repair.NONE and self.calibration_data is not None

    @property
    def channel_multiple(self) -> int:
        """What channel counts round to: ``round_to``, else the target's SIMD multiple."""
        if self.round_to is not None:
            return self.round_to
        from onnxforge.targets import get_target

        return get_target(self.target).channel_multiple


@dataclass
class PrunedModel:
    """A pruned model (not yet repaired) and what was done to it."""

    model: onnx.ModelProto
    groups: list[dict]
    pruned_layers: dict[str, str]  # producer layer -> "C -> C'"
    skipped_layers: dict[str, str]  # layer -> reason
    repair_layers: list[str]  # output names of layers whose input channels shrank, in graph order
    kept_outputs: dict[str, np.ndarray]  # value name -> kept channel positions (pruned values only)
    attention_heads: dict[str, int] = field(default_factory=dict)  # attention block -> heads before pruning


@dataclass
class ChannelPruneResult(JsonResult):
    """What prune_channels() did. The output path is not saved (the caller has it); the MAC ratio,
    the measured speedup and whether quality was measured are derived (``json_extra``)."""

    path: Path | None = field(metadata={"json": False})
    ratio: float
    groups: list[dict]
    pruned_layers: dict[str, str]
    skipped_layers: dict[str, str]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    repaired: bool
    repair_errors: dict[str, dict] = field(default_factory=dict)
    score_before: float | None = None
    score_without_repair: float | None = None
    score_after: float | None = None
    gate: str | None = None
    tried: list[dict] = field(default_factory=list)
    quality: str = ""  # what the scores rest on, or "quality NOT measured: ..."
    speed: dict | None = None  # input vs pruned, timed interleaved at the model's batch (QualityCheck.speedup)
    macs_shapes: dict | None = None  # the input shapes the MAC estimates were counted at
    notes: list[str] = field(default_factory=list)  # what was normalized on load
    head_ratio: float = 0.0

    def json_extra(self) -> dict[str, Any]:
        return {
            "quality_measured": self.score_after is not None,
            "measured_speedup": self.speed["speedup"] if self.speed else None,
            "macs_are_estimates": True,
            "macs_ratio": self.macs_before / self.macs_after if self.macs_after else None,
        }
