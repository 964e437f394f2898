"""Structured channel pruning on the ONNX graph: the plan, the rewrite and the stage.

1. Groups: :func:`onnxforge.pipeline.prune.coupling.find_channel_groups` ties every tensor
   dimension that must shrink together (Conv outputs, the bias/BN/elementwise ops that follow, both
   branches of a residual Add, Concat offsets, depthwise Convs, Flatten/Reshape into Gemm, consumers'
   inputs, MatMul -> Add(bias) -> Erf-GELU -> MatMul in transformer FFNs, with channels on the last
   axis). A group that passes through a grouped Conv (group G) keeps the same number of channels in
   each of its G blocks, so the Conv keeps ``group = G`` (its weight's input axis is cut block by block).
   With ``head_ratio`` the attention heads of every unfused attention block are groups too
   (onnxforge.pipeline.prune.heads: Q/K/V column slices, Wo rows, head-count Reshape constants; whole
   heads, at least one kept; fused or unrecognized attention is refused). The back-off lowers both ratios.
2. Importance of each channel: ``l1``, ``l2`` or ``activation`` (onnxforge.pipeline.prune.importance).
3. Ratio R: each prunable group of C channels keeps the max(1, C - round(R_g*C)) most important ones
   (rounded to a multiple of ``round_to``, by default the target's ``channel_multiple``: a layer
   narrower than the multiple is not rounded, and no count rounds past its layer's size or to zero),
   with R_g = R (``uniform``) or, with ``sensitivity``, R_g
   ~ s_g^-1/2 from a scan (s_g = output error when group g alone is pruned at R), scaled so the
   total share removed stays R; ``depth_scales`` multiply R_g bucket by bucket (early ... late groups),
   scaled back to R in total (onnxforge.pipeline.prune.allocation); the rewrite
   (onnxforge.pipeline.prune.channel_rewrite) slices every coupled constant, rewrites depthwise
   ``group`` attributes and Reshape shape literals, drops stale shapes and checks
   the result (onnx.checker + shape inference + an onnxruntime session).
4. Repair: the layers whose inputs shrank are refit by least squares on calibration data
   (onnxforge.pipeline.prune.repair).

Then the tolerance loop (onnxforge.pipeline.prune.backoff), on the eval data or else on held-out
calibration samples (onnxforge.pipeline.prune.checks): try R, back off x0.75 until the quality gate
holds (never to a ratio that removes no channel), keep the most-pruned model that passes
(QualityGateError, exit 4, with every try's numbers, when none does). With ``objective`` latency (the
default) a try within the tolerance is timed against the input and one measured slower misses too.
Nothing is written before the kept model has run and been timed against the input; MACs are
estimates at the data's shapes.
"""

from __future__ import annotations

import os
from dataclasses import replace

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.errors import CalibrationDataError, QualityGateError
from onnxforge.model_cost import count_params_and_macs
from onnxforge.model_io import input_specs, save_model
from onnxforge.pipeline.calibration import SampleSet, StreamedSamples
from onnxforge.pipeline.data_spec import open_data
from onnxforge.pipeline.gate_rules import loosen_hint
from onnxforge.pipeline.normalize import load_stage_input
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.prune.allocation import allocated_ratios, sensitivity_ratios
from onnxforge.pipeline.prune.backoff import QualityCheck, back_off, shrink
from onnxforge.pipeline.prune.channel_config import (
    Allocation,
    ChannelPruneConfig,
    ChannelPruneResult,
    PrunedModel,
    Repair,
)
from onnxforge.pipeline.prune.channel_rewrite import channels_removed, keep_count, prune_model, removes_any
from onnxforge.pipeline.prune.checks import Objective, slower_message
from onnxforge.pipeline.prune.graph import lift_constants
from onnxforge.pipeline.prune.heads import heads_kept
from onnxforge.pipeline.prune.importance import Importance
from onnxforge.pipeline.prune.repair import repair_model

__all__ = [
    "Allocation",
    "ChannelPruneConfig",
    "ChannelPruneResult",
    "Importance",
    "PrunedModel",
    "Repair",
    "prune_channels",
    "prune_model",
    "sensitivity_ratios",
]


def prune_channels(
    input_path: str | os.PathLike, output: str | os.PathLike, config: ChannelPruneConfig = ChannelPruneConfig(),
    *, progress: Progress = ignore,
) -> ChannelPruneResult:
    """Prune ``input_path``'s channels into ``output``, lowering the ratio until the quality gate holds.

    Quality is gated on the eval data, else on held-out calibration samples (then not used for the
    repair); without either it is not measured and the result says so. Measured and returned: the
    groups found, pruned and skipped layers with reasons, parameters, estimated MACs (at the data's
    shapes), the per-layer repair errors, the scores of the original, of the pruned model without
    repair and of the kept one, every try, and the kept model's speed vs the input (interleaved, at the
    model's own batch size). The file is written last, once all of that is known.
    """
    out = check_output_path(output, input_path, *paths_in(config))
    loaded = load_stage_input(input_path, "prune-channels")
    model = lift_constants(loaded.model)  # weights in Constant nodes (paddle2onnx) are weights too
    data: SampleSet | StreamedSamples | None = None
    if config.calibration_data is not None:
        data = open_data(config.calibration_data, input_specs(model), equal_shapes=True)  # read as deep as used
    check, calibration = QualityCheck.measure(model, config, data, max_fit=config.calibration_samples,
                                              progress=progress)

    def fit_samples() -> SampleSet:
        if calibration is None:  # never: the config refuses sensitivity and repair without calibration data
            raise CalibrationDataError("the sensitivity scan and the repair need calibration data")
        return calibration
    shapes = check.shapes
    params_before, macs_before = count_params_and_macs(model, shapes)
    tried: list[dict] = []
    round_to = config.channel_multiple
    speed_gated = config.gate and config.objective is Objective.LATENCY

    def attempt(strength: tuple[float, float]) -> tuple[tuple, bool]:
        ratio, head_ratio = strength
        attempt_config = replace(config, ratio=ratio, head_ratio=head_ratio)
        group_ratios = allocated_ratios(model, attempt_config, calibration, shapes, progress=progress)
        step(progress, f"try {len(tried) + 1}: pruning", message=f"ratio {ratio:.3f}")
        pruned = prune_model(model, attempt_config, calibration, group_ratios, input_shapes=shapes)
        candidate = pruned.model
        repair_errors: dict[str, dict] = {}
        check.runs(candidate, "prune-channels")
        unrepaired_score = check.score(candidate)
        if attempt_config.repairs:
            candidate, repair_errors = repair_model(model, pruned, fit_samples(), attempt_config, progress)
            check.runs(candidate, "prune-channels (after the least-squares repair)")
        value = check.score(candidate) if attempt_config.repairs else unrepaired_score
        within = check.passes(value, candidate)
        speed, slower = None, False
        if within and speed_gated and pruned.pruned_layers:
            speed, slower = check.slower(model, candidate)  # slower than the input: a miss, like quality
        tried.append(
            {
                "ratio": round(ratio, 4),
                **({"head_ratio": round(head_ratio, 4)} if config.head_ratio else {}),
                "score_without_repair": unrepaired_score,
                "score": value,
                "passes": within and not slower,
                "channels_removed": channels_removed(pruned),
                "speedup": speed["speedup"] if speed else None,
                "slower": slower,
                "gate": check.verdict_note(candidate),  # every rule's line: interval, churn, worst sample
            }
        )
        if group_ratios is not None:
            tried[-1]["group_ratios"] = {str(k): round(v, 4) for k, v in group_ratios.items()}
        outcome = ((ratio, head_ratio), pruned, candidate, repair_errors, unrepaired_score, value, speed)
        return outcome, (within and not slower) or not config.gate

    def kept_counts(strength: tuple[float, float], pruned: PrunedModel) -> tuple:
        ratio, head_ratio = strength
        return (tuple(keep_count(g["channels"], ratio, round_to) for g in pruned.groups
                      if g["prunable"] and g.get("blocks", 1) == 1),
                tuple(heads_kept(h, head_ratio) for h in pruned.attention_heads.values()))

    def lower(strength: tuple[float, float], outcome: tuple) -> tuple[float, float] | None:
        tried_counts = kept_counts(strength, outcome[1])
        while True:
            ratio, head_ratio = (shrink(r) or 0.0 if r > 0 else 0.0 for r in strength)
            heads = any(heads_kept(h, head_ratio) < h for h in outcome[1].attention_heads.values())
            channels = ratio > 0.0 and removes_any(outcome[1].groups, ratio, round_to)
            if not channels and not heads:
                return None  # a ratio that removes no channel and no head is not pruning: stop there
            strength = ratio, head_ratio
            # whole heads and rounded channel counts: a lower ratio may build the same model again
            uniform = config.allocation is Allocation.UNIFORM and not config.depth_scales
            if not uniform or kept_counts(strength, outcome[1]) != tried_counts:
                return strength

    kept = back_off((config.ratio, config.head_ratio), attempt, lower)
    (ratio, head_ratio), pruned, candidate, repair_errors, unrepaired_score, value, speed = kept.outcome
    passed = kept.passed
    if not passed:
        candidate, value, speed = model, check.reference_score, None
    params_after, macs_after = count_params_and_macs(candidate, shapes)
    if speed is None and passed and pruned.pruned_layers:
        speed = check.speedup(model, candidate)
    result = ChannelPruneResult(
        path=out,
        ratio=ratio if passed else 0.0,
        head_ratio=head_ratio if passed else 0.0,
        groups=pruned.groups,
        pruned_layers=pruned.pruned_layers if passed else {},
        skipped_layers=pruned.skipped_layers,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        repaired=config.repairs and passed,
        repair_errors=repair_errors,
        score_before=check.reference_score,
        score_without_repair=unrepaired_score,
        score_after=value,
        gate=check.describe(),
        tried=tried,
        quality=check.quality_note(),
        speed=speed,
        macs_shapes=shapes,
        notes=loaded.notes,
    )
    save_model(candidate, out)
    if not passed and any(t["slower"] for t in tried):
        raise QualityGateError(
            f"no channel ratio down to {tried[-1]['ratio']:.3f} is both within the tolerance and not slower than "
            f"the input: {slower_message(tried)}; the unpruned model is saved at {out}",
            hint="check --round-to (the target's SIMD multiple runs round channel counts fastest), --exclude "
            "the layers that slowed down, or pass --objective size to keep a smaller, slower model",
            best_path=str(out),
            result=result.to_json(),
        )
    if not passed:
        gate, reference_score, best = check.failure(tried)
        raise QualityGateError(
            f"no channel ratio down to {tried[-1]['ratio']:.3f} meets the tolerance ({check.describe()}, on "
            f"{check.source}): the input scores {gate.format(reference_score)}, the best try (ratio "
            f"{best['ratio']:.3f}) {gate.format(best['score'])} ({best['gate']}); the unpruned model is saved at {out}",
            hint=loosen_hint(gate, best["gate"]) + ", pass --calibration for the least-squares repair, or --exclude "
            "sensitive layers",
            best_path=str(out),
            result=result.to_json(),
        )
    return result
