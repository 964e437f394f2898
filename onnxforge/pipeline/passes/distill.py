"""``distill``: the pruned (repaired) model trained against the framework model it came from.

Inputs: the recipe's model (the teacher: a PyTorch source, or a Hugging Face folder, whose student is
the pruned graph itself run in torch) and the pruned ONNX graph (the student's
structure and starting weights): ``- distill: {inputs: [source, prune_channels]}``. Training runs
in PyTorch (onnxforge.converters.distill); an .onnx recipe model has no bridge back to PyTorch, and
the stage says so in one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from onnxforge.converters.distill_config import DistillConfig, DistillResult
from onnxforge.pipeline import codec
from onnxforge.pipeline.registry import Artifact, Knob, KnobKind, Pass, Phase, StageContext, register

if TYPE_CHECKING:
    import onnx


@register
class DistillPass(Pass[DistillConfig, DistillResult]):
    name = "distill"
    config_cls = DistillConfig
    description = "train the pruned student against its teacher (PyTorch sources, Hugging Face folders)"
    consumes = (Artifact.SOURCE, Artifact.ONNX)
    phase = Phase.RECOVERY
    fills: ClassVar[Mapping[str, str]] = {"calibration_data": "calibration", "eval_data": "eval"}

    @classmethod
    def knobs(cls, target: str, model: onnx.ModelProto | None = None) -> tuple[Knob, ...]:
        return (Knob("epochs", KnobKind.CHOICE, choices=(10, 30),
                     help="training epochs (early stopping may end sooner)"),)

    @classmethod
    def search_defaults(cls, context: StageContext) -> dict[str, Any]:
        # No gate of its own (the search scores the chain) and a bound on each trial's training.
        data = {"calibration_data": codec.encode(context.calibration)} if context.calibration is not None else {}
        return {**data, "time_budget_s": 600.0}

    def run(self, config: DistillConfig, inputs: Sequence[str], output: Path, context: StageContext) -> DistillResult:
        from onnxforge.converters.distill import distill

        return distill(inputs[0], inputs[1], output, config, progress=context.progress)

    def verified(self, result: DistillResult) -> bool:
        return result.verified

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        metric = result.get("held_out_metric", "metric")
        before, after = result.get("held_out_before"), result.get("held_out_after")
        text = f"distilled {result.get('epochs_run', 0)} epochs in {result.get('train_seconds', 0):.0f} s"
        if before is not None and after is not None:
            text += f", held-out {metric} {before:.4f} -> {after:.4f}"
        return text
