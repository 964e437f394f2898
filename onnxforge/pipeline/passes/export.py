"""``export``: a framework source (file.py:callable, .pt, .pt2, .keras, builtin:NAME, or .onnx) to ONNX,
parity-checked against the framework (see onnxforge.converters)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from onnxforge.converters.config import ExportConfig, ExportResult
from onnxforge.pipeline.registry import Artifact, Pass, Phase, StageContext, register


@register
class ExportPass(Pass[ExportConfig, ExportResult]):
    name = "export"
    config_cls = ExportConfig
    description = "framework model to ONNX, parity checked"
    consumes = (Artifact.SOURCE,)
    phase = Phase.EXPORT
    fills: ClassVar[Mapping[str, str]] = {"input_shapes": "input_shapes", "dynamic_batch": "dynamic_batch",
                                          "input_dtypes": "input_dtypes", "dynamic_axes": "dynamic_axes"}

    def run(self, config: ExportConfig, inputs: Sequence[str], output: Path, context: StageContext) -> ExportResult:
        from onnxforge import converters

        return converters.export(inputs[0], output, config, timeout=config.timeout_s)

    def verified(self, result: ExportResult) -> bool:
        return result.verified or result.parity is None

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        parity = result.get("parity") or {}
        worst = max((o["max_abs_error"] for o in parity.get("outputs", [])), default=None)
        parity_text = f", parity max err {worst:.1e}" if worst is not None else ""
        return f"{result.get('exporter', '?')} exporter" + parity_text
