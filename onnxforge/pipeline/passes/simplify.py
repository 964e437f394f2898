"""``simplify``: onnxsim, onnxslim and onnxruntime's graph optimizer; the smallest graph with parity wins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from onnxforge.pipeline.registry import Pass, Phase, StageContext, register
from onnxforge.pipeline.simplify import SimplifyConfig, SimplifyResult, simplify


@register
class SimplifyPass(Pass[SimplifyConfig, SimplifyResult]):
    name = "simplify"
    config_cls = SimplifyConfig
    description = "fold constants and fuse nodes; parity checked"
    phase = Phase.GRAPH
    # parity on the recipe's real data
    fills: ClassVar[Mapping[str, str]] = {"input_shapes": "input_shapes", "sample_data": "calibration"}

    def run(self, config: SimplifyConfig, inputs: Sequence[str], output: Path, context: StageContext) -> SimplifyResult:
        return simplify(inputs[0], output, config)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        return (f"{result.get('chosen', '?')}: {result.get('nodes_before', '?')} -> "
                f"{result.get('nodes_after', '?')} nodes")
