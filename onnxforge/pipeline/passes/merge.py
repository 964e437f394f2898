"""``merge``: pre/post-processing (and ensembles of several inputs) joined into one deployable graph,
parity checked step by step; runs last (packaging), so later stages never rewrite the merged blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxforge.errors import MergeError
from onnxforge.pipeline.merge import MergeConfig, merge
from onnxforge.pipeline.registry import Artifact, Pass, Phase, StageContext, register


@register
class MergePass(Pass):
    name = "merge"
    config_cls = MergeConfig
    description = "pre/post-processing or an ensemble joined into one graph, parity checked"
    consumes = (Artifact.ONNX,)
    variadic = True  # an ensemble: inputs: [a, b, c]
    phase = Phase.PACKAGING
    fills = {"eval_data": "eval"}

    def run(self, config: MergeConfig, inputs: Sequence[str], output: Path, context: StageContext) -> Any:
        if config.tokenizer is not None and config.tokenizer.vocab is None:
            # A stage's input is a file in the run folder, with no vocab.txt beside it; and the cache key
            # hashes only the files the config names.
            raise MergeError("a merge stage with a tokenizer names its vocabulary",
                             hint="tokenizer: {vocab: path/to/vocab.txt}")
        return merge(list(inputs), output, config)

    def verified(self, result: Any) -> bool:
        return result.verified

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        parity = result.get("parity") or {}
        worst = max((o["max_abs_error"] for o in parity.get("outputs", [])), default=None)
        text = " + ".join(result.get("blocks", []))
        if worst is not None:
            text += f", parity max err {worst:.1e}"
        merged = (result.get("accuracy") or {}).get("merged")
        return text + (f", accuracy {merged:.2%}" if merged is not None else "")
