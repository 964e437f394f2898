"""``quantize``: the target's candidate schemes calibrated and measured; the fastest within tolerance wins
when it is faster than the input (or the smallest, when smaller, with ``objective: size``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import onnx

from onnxforge.pipeline.quantize import QuantizeConfig, QuantizeResult, quantize, scheme_id
from onnxforge.pipeline.quantize.transformer_fusion import looks_like_transformer
from onnxforge.pipeline.registry import Knob, KnobKind, Pass, Phase, StageContext, register
from onnxforge.targets.cpu import has_matmul_weights

FLOAT_SHARES = (0.0, 0.05, 0.1, 0.2)


@register
class QuantizePass(Pass[QuantizeConfig, QuantizeResult]):
    name = "quantize"
    config_cls = QuantizeConfig
    description = "int8 (static or dynamic) or fp16, measured on the target"
    phase = Phase.PRECISION
    fills: ClassVar[Mapping[str, str]] = {"target": "target", "eval_data": "eval", "max_samples": "max_samples"}
    reads = ("calibration",)

    @classmethod
    def knobs(cls, target: str, model: onnx.ModelProto | None = None) -> tuple[Knob, ...]:
        """The target's schemes for this model, plus two of those it adds for MatMul-dominated models
        when the model has MatMul weights at all: the first dynamic one and int4 where the target runs
        MatMulNBits (a conv-only graph has nothing either would quantize); int4's block size and
        accuracy level when int4 is a choice; the share of nodes kept in float when an int8 scheme is;
        whether attention is fused on transformers with a dynamic scheme. Without a model: every scheme
        the target has (what a pinned ``quantize.schemes`` is checked against before the model is read)."""
        from onnxforge.targets import QuantMethod, get_target

        found = get_target(target)
        if model is None:
            candidates = list(dict.fromkeys([*found.quant_candidates(None), *found.matmul_candidates()]))
        else:
            matmul = found.matmul_candidates() if has_matmul_weights(model) else []
            extra = ([s for s in matmul if s.method is QuantMethod.DYNAMIC][:1]
                     + [s for s in matmul if s.method is QuantMethod.INT4])
            candidates = list(dict.fromkeys([*found.quant_candidates(model), *extra]))
        schemes = tuple([scheme_id(s)] for s in candidates)
        knobs = [Knob("schemes", KnobKind.CHOICE, choices=schemes, help="the scheme measured", seed_every_choice=True)]
        if any(s.method in (QuantMethod.STATIC, QuantMethod.DYNAMIC) for s in candidates):
            # a little speed for quality: the most sensitive int8 nodes stay float (0 first: the seeds quantize
            # everything); fp16 and int4 trials ignore it (a note says so)
            knobs.append(Knob("float_share", KnobKind.CHOICE, choices=FLOAT_SHARES,
                              help="int8: share of quantized nodes kept in float, most sensitive first"))
        if (model is None or looks_like_transformer(model)) and any(
                s.method is QuantMethod.DYNAMIC for s in candidates):
            # QAttention is faster at batch 1, three whole-batch MatMuls at batch 32 (MiniLM here): the
            # quantize stage times at batch 1, the search at its own
            knobs.append(Knob("fuse_attention", KnobKind.CHOICE, choices=(True, False),
                              help="dynamic int8 on transformers: attention fused into QAttention"))
        if any(s.method is QuantMethod.INT4 for s in candidates):
            knobs += [
                Knob("int4_block_size", KnobKind.CHOICE, choices=(32, 64, 128), help="int4: weights per scale along K"),
                Knob("int4_accuracy_level", KnobKind.CHOICE, choices=(0, 4),
                     help="int4: MatMulNBits compute (4: int8)"),
            ]
        return tuple(knobs)

    @classmethod
    def search_defaults(cls, context: StageContext) -> dict[str, Any]:
        # One scheme per trial, no mixed precision, no gate of its own: the search scores the chain. With one
        # scheme the objective only decides whether the trial keeps the input; size keeps the (smaller)
        # quantized model, and the search times the chain itself rather than trusting 3 rounds (issue 23).
        return {"target": context.target, "mixed_precision": False, "metric": "rel-error", "tolerance": 1e30,
                "error_report": False, "latency_rounds": 3, "objective": "size"}

    def run(self, config: QuantizeConfig, inputs: Sequence[str], output: Path, context: StageContext) -> QuantizeResult:
        return quantize(inputs[0], output, context.require_calibration(self.name), config, cache=context.cache,
                        progress=context.progress)

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        chosen: Mapping[str, Any] = next(
            (c for c in result.get("candidates", []) if c.get("scheme") == result.get("chosen")), {})
        speed = result.get("measured_speedup", chosen.get("speedup_vs_fp32"))  # the run table's, in a run
        pace = ("" if speed is None else f", {speed:.2f}x fp32's speed" if speed >= 1
                else f", {1 / speed:.2f}x SLOWER than fp32")
        return f"{result.get('chosen', '?')} of {len(result.get('candidates', []))} measured{pace}"
