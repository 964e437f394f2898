"""``fp16``: half-precision weights and activations for GPU targets (inputs/outputs stay fp32)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from onnxforge.pipeline.fp16 import Fp16Config, Fp16Result, convert_fp16
from onnxforge.pipeline.registry import Pass, Phase, StageContext, register


@register
class Fp16Pass(Pass[Fp16Config, Fp16Result]):
    name = "fp16"
    config_cls = Fp16Config
    description = "fp16 for CUDA/TensorRT, parity checked"
    phase = Phase.PRECISION
    # parity on the recipe's real data
    fills: ClassVar[Mapping[str, str]] = {"input_shapes": "input_shapes", "sample_data": "calibration"}

    def run(self, config: Fp16Config, inputs: Sequence[str], output: Path, context: StageContext) -> Fp16Result:
        return convert_fp16(inputs[0], output, config)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        worst = max((o["max_abs_error"] for o in (result.get("parity") or {}).get("outputs", [])), default=None)
        return "fp16 for GPU" + (f", parity max err {worst:.1e}" if worst is not None else "")
