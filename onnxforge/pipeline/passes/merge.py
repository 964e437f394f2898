"""``merge``: pre/post-processing (and ensembles of several inputs) joined into one deployable graph,
parity checked step by step; runs last (packaging), so later stages never rewrite the merged blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from onnxforge.errors import MergeError, RecipeError
from onnxforge.pipeline import codec
from onnxforge.pipeline.merge import ImagePre, MergeConfig, MergeResult, merge
from onnxforge.pipeline.registry import Artifact, Pass, Phase, StageContext, register


@register
class MergePass(Pass[MergeConfig, MergeResult]):
    name = "merge"
    config_cls = MergeConfig
    description = "pre/post-processing or an ensemble joined into one graph, parity checked"
    consumes = (Artifact.ONNX,)
    variadic = True  # an ensemble: inputs: [a, b, c]
    phase = Phase.PACKAGING
    fills: ClassVar[Mapping[str, str]] = {"eval_data": "eval"}

    @classmethod
    def from_recipe(cls, values: dict[str, Any], context: StageContext, where: str) -> dict[str, Any]:
        """An image ``pre`` ships the normalization the recipe's image calibration declares: what calibrates
        is what ships. Options it leaves out are taken from the calibration; options that differ are refused."""
        image = getattr(context.calibration, "image", None)
        pre = values.get("pre")
        if image is None or not (pre == "image" or (isinstance(pre, Mapping) and set(pre) == {"image"})):
            return values
        options = dict((pre["image"] or {}) if isinstance(pre, Mapping) else {})
        declared = codec.encode(ImagePre.from_preprocessing(image))["image"]
        for key in ("scale", "mean", "std", "network_layout"):
            want = declared[key]
            if key not in options or options[key] == "auto":
                options[key] = want
            elif want != "auto" and _plain(options[key]) != _plain(want):
                raise RecipeError(
                    f"{where}.pre.image.{key}: {options[key]!r} differs from the calibration's {want!r}: the merged "
                    "graph would normalize images otherwise than the model was calibrated",
                    hint=f"drop {key} here (it comes from 'calibration'), or change it there")
        return {**values, "pre": {"image": options}}

    def run(self, config: MergeConfig, inputs: Sequence[str], output: Path, context: StageContext) -> MergeResult:
        if config.tokenizer is not None and config.tokenizer.vocab is None:
            # A stage's input is a file in the run folder, with no vocab.txt beside it; and the cache key
            # hashes only the files the config names.
            raise MergeError("a merge stage with a tokenizer names its vocabulary",
                             hint="tokenizer: {vocab: path/to/vocab.txt}")
        return merge(list(inputs), output, config)

    def verified(self, result: MergeResult) -> bool:
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


def _plain(value: Any) -> Any:
    """A recipe number or list of numbers compared by value (1 == 1.0)."""
    try:
        if isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    except (TypeError, ValueError):  # not numbers: decoding the config names the key
        return value
