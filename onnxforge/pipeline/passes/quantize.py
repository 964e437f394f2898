"""``quantize``: the target's candidate schemes calibrated and measured; the fastest within tolerance wins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxforge.pipeline.quantize import QuantizeConfig, quantize, scheme_id
from onnxforge.pipeline.registry import Knob, KnobKind, Pass, Phase, StageContext, register


@register
class QuantizePass(Pass):
    name = "quantize"
    config_cls = QuantizeConfig
    description = "int8 (static or dynamic) or fp16, measured on the target"
    phase = Phase.PRECISION
    fills = {"target": "target", "eval_data": "eval"}
    reads = ("calibration",)

    @classmethod
    def knobs(cls, target: str) -> tuple[Knob, ...]:
        from onnxforge.targets import get_target

        schemes = tuple([scheme_id(s)] for s in get_target(target).quant_candidates(None))
        return (Knob("schemes", KnobKind.CHOICE, choices=schemes, help="the scheme measured", seed_every_choice=True),)

    @classmethod
    def search_defaults(cls, context: StageContext) -> dict[str, Any]:
        # One scheme per trial, no mixed precision, no gate of its own: the search scores the chain.
        return {"target": context.target, "mixed_precision": False, "metric": "rel-error", "tolerance": 1e30,
                "error_report": False, "latency_rounds": 3}

    def run(self, config: QuantizeConfig, inputs: Sequence[str], output: Path, context: StageContext) -> Any:
        return quantize(inputs[0], output, context.require_calibration(self.name).source(), config)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        return f"{result.get('chosen', '?')} of {len(result.get('candidates', []))} measured"
