"""``fp16``: half-precision weights and activations for GPU targets (inputs/outputs stay fp32)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxforge.pipeline.fp16 import Fp16Config, convert_fp16
from onnxforge.pipeline.registry import Pass, Phase, StageContext, register


@register
class Fp16Pass(Pass):
    name = "fp16"
    config_cls = Fp16Config
    description = "fp16 for CUDA/TensorRT, parity checked"
    phase = Phase.PRECISION
    fills = {"input_shapes": "input_shapes", "sample_data": "calibration"}  # parity on the recipe's real data

    def run(self, config: Fp16Config, inputs: Sequence[str], output: Path, context: StageContext) -> Any:
        return convert_fp16(inputs[0], output, config)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        worst = max((o["max_abs_error"] for o in (result.get("parity") or {}).get("outputs", [])), default=None)
        return "fp16 for GPU" + (f", parity max err {worst:.1e}" if worst is not None else "")
