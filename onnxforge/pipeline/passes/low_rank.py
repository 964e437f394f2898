"""``low_rank``: factor dense layers into two thinner ones by SVD (data-aware with calibration data)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import onnx

from onnxforge.pipeline import codec
from onnxforge.pipeline.prune.low_rank import LowRankConfig, LowRankResult, layer_candidates, low_rank
from onnxforge.pipeline.registry import Knob, KnobKind, Pass, Phase, StageContext, register


@register
class LowRankPass(Pass[LowRankConfig, LowRankResult]):
    name = "low_rank"
    config_cls = LowRankConfig
    description = "factor MatMul/Gemm/1x1 Conv weights by SVD"
    phase = Phase.STRUCTURE
    fills: ClassVar[Mapping[str, str]] = {"calibration_data": "calibration", "eval_data": "eval", "target": "target",
                                          "max_samples": "max_samples"}

    @classmethod
    def knobs(cls, target: str, model: onnx.ModelProto | None = None) -> tuple[Knob, ...]:
        if model is not None and not layer_candidates(model, LowRankConfig())[0]:
            return ()  # no MatMul/Gemm/1x1 Conv large enough to factor
        return (Knob("energy", KnobKind.FLOAT, low=0.8, high=0.99, step=0.01, help="singular-value energy kept"),)

    @classmethod
    def search_defaults(cls, context: StageContext) -> dict[str, Any]:
        spec = context.calibration
        data = {"calibration_data": codec.encode(spec)} if spec is not None else {}
        return {**data, "measure_latency": False, "target": context.target, "gate": False}

    def run(self, config: LowRankConfig, inputs: Sequence[str], output: Path, context: StageContext) -> LowRankResult:
        return low_rank(inputs[0], output, config, progress=context.progress)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        speed = result.get("measured_speedup")
        return (f"{len(result.get('factored_layers', {}))} layers factored"
                + (f", measured {speed:.2f}x the input's speed" if speed else "")
                + ("" if result.get("quality_measured", True) else ", quality NOT measured"))
