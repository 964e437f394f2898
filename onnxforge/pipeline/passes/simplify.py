"""``simplify``: onnxsim, onnxslim and onnxruntime's graph optimizer; the smallest graph with parity wins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxforge.pipeline.registry import Pass, Phase, StageContext, register
from onnxforge.pipeline.simplify import SimplifyConfig, simplify


@register
class SimplifyPass(Pass):
    name = "simplify"
    config_cls = SimplifyConfig
    description = "fold constants and fuse nodes; parity checked"
    phase = Phase.GRAPH
    fills = {"input_shapes": "input_shapes", "sample_data": "calibration"}  # parity on the recipe's real data

    def run(self, config: SimplifyConfig, inputs: Sequence[str], output: Path, context: StageContext) -> Any:
        return simplify(inputs[0], output, config)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        return f"{result.get('chosen', '?')}: {result.get('nodes_before', '?')} -> {result.get('nodes_after', '?')} nodes"
