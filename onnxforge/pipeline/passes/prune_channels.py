"""``prune_channels``: structured channel pruning (really smaller, faster layers), repaired by least squares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import onnx

from onnxforge.pipeline import codec
from onnxforge.pipeline.prune.channels import ChannelPruneConfig, ChannelPruneResult, prune_channels
from onnxforge.pipeline.prune.coupling import prunable_groups
from onnxforge.pipeline.prune.heads import has_attention
from onnxforge.pipeline.registry import Knob, KnobKind, Pass, Phase, StageContext, register

# early / middle / late multipliers the search tries (none: uniform; each is scaled back to the ratio in
# total): the late, wide layers hold redundant channels; the early ones run at full resolution (time)
DEPTH_PRESETS: tuple[list[float], ...] = ([], [0.5, 1.0, 1.5], [1.5, 1.0, 0.5], [0.75, 1.5, 0.75])
DEPTH_BUCKETS = 3


@register
class ChannelPrunePass(Pass[ChannelPruneConfig, ChannelPruneResult]):
    name = "prune_channels"
    config_cls = ChannelPruneConfig
    description = "remove whole channels, refit the next layers by least squares"
    phase = Phase.STRUCTURE
    fills: ClassVar[Mapping[str, str]] = {"calibration_data": "calibration", "eval_data": "eval", "target": "target",
                                          "max_samples": "max_samples"}

    @classmethod
    def knobs(cls, target: str, model: onnx.ModelProto | None = None) -> tuple[Knob, ...]:
        groups = len(prunable_groups(model)) if model is not None else None  # not blocked (outputs, 1 wide, ...)
        heads = model is None or has_attention(model)
        knobs: tuple[Knob, ...] = (
            Knob("ratio", KnobKind.FLOAT, low=0.1, high=0.8, step=0.05, help="share of channels removed per group"),
            Knob("importance", KnobKind.CHOICE, choices=("l2", "activation"), help="which channels go"),
        ) if groups is None or groups else ()
        # where the ratio goes: with one group both allocations are the ratio itself, and a depth bucket
        # needs a group of its own (uniform first: the seed trial is the plain ratio)
        if groups is None or groups >= 2:
            knobs += (Knob("allocation", KnobKind.CHOICE, choices=("uniform", "sensitivity"),
                           help="same ratio everywhere, or robust groups give up more"),)
        if groups is None or groups >= DEPTH_BUCKETS:
            knobs += (Knob("depth_scales", KnobKind.CHOICE, choices=DEPTH_PRESETS,
                           help="ratio multipliers for early, middle and late groups (total share kept)"),)
        # whole heads of every attention block, offered only where the graph has attention (on a CNN it
        # would only multiply identical trials); 0.125 steps are 1.5 of 12 heads: the rounding decides
        return knobs + ((Knob("head_ratio", KnobKind.FLOAT, low=0.0, high=0.5, step=0.125,
                              help="share of attention heads removed per block"),) if heads else ())

    @classmethod
    def search_defaults(cls, context: StageContext) -> dict[str, Any]:
        # Channel counts round to the target's vector width by default (round_to None: odd counts ran ~2x
        # slower than round ones at the same MACs on the CPU, onnxruntime's NCHWc blocked convolutions).
        # The search varies the ratio and scores every trial itself: the stage keeps the ratio it is given.
        values: dict[str, Any] = {"target": context.target, "gate": False}
        if context.calibration is not None:
            # the whole DataSpec: images keep their options
            values["calibration_data"] = codec.encode(context.calibration)
        return values

    def run(self, config: ChannelPruneConfig, inputs: Sequence[str], output: Path,
            context: StageContext) -> ChannelPruneResult:
        return prune_channels(inputs[0], output, config, progress=context.progress)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        speed = result.get("measured_speedup")
        heads = sum(1 for change in result.get("pruned_layers", {}).values() if change.endswith("heads"))
        return (f"{result.get('ratio', 0):.0%} of channels removed, "
                + (f"heads removed in {heads} attention blocks, " if heads else "")
                + f"est. {result.get('macs_ratio') or 0:.1f}x fewer MACs"
                + (f", measured {speed:.2f}x the input's speed" if speed else "")
                + (", repaired" if result.get("repaired") else "")
                + ("" if result.get("quality_measured", True) else ", quality NOT measured"))
