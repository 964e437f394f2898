"""``prune``: magnitude sparsity (zeros in the weights: a smaller compressed file, the same dense speed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from onnxforge.pipeline.prune.magnitude import MagnitudePruneConfig, MagnitudePruneResult, prune_magnitude
from onnxforge.pipeline.registry import Pass, Phase, StageContext, register


@register
class MagnitudePrunePass(Pass[MagnitudePruneConfig, MagnitudePruneResult]):
    name = "prune"
    config_cls = MagnitudePruneConfig
    description = "zero the smallest weights (smaller compressed file, same speed)"
    phase = Phase.SPARSITY
    fills: ClassVar[Mapping[str, str]] = {"eval_data": "eval", "target": "target", "max_samples": "max_samples"}

    def run(self, config: MagnitudePruneConfig, inputs: Sequence[str], output: Path,
            context: StageContext) -> MagnitudePruneResult:
        return prune_magnitude(inputs[0], output, config, progress=context.progress)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        return (f"sparsity {result.get('achieved_sparsity', 0):.0%} (asked {result.get('requested_sparsity', 0):.0%})"
                + ("" if result.get("quality_measured", True) else ", quality NOT measured"))
