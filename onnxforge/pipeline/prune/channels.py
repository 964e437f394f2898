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
   total share removed stays R; the rewrite slices every coupled constant,
   rewrites depthwise ``group`` attributes and Reshape shape literals, drops stale shapes and checks
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

import enum
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.errors import CalibrationDataError, QualityGateError, UsageError
from onnxforge.model_cost import count_params_and_macs
from onnxforge.model_io import input_specs, save_model
from onnxforge.pipeline.calibration import SampleSet, StreamedSamples
from onnxforge.pipeline.codec import JsonResult, option
from onnxforge.pipeline.data_spec import DataSpec, open_data, set_data_fields
from onnxforge.pipeline.evaluate import MAX_CHURN_HELP, METRIC_HELP, WORST_COSINE_HELP, Metric
from onnxforge.pipeline.normalize import load_stage_input
from onnxforge.pipeline.progress import Progress, counted, ignore, step
from onnxforge.pipeline.prune.activations import batches_of_values
from onnxforge.pipeline.prune.backoff import QualityCheck, back_off, shrink
from onnxforge.pipeline.prune.checks import Objective, slower_message
from onnxforge.pipeline.prune.coupling import find_channel_groups
from onnxforge.pipeline.prune.graph import (
    checked_model,
    clear_inner_shapes,
    const_array,
    const_input,
    const_shape,
    drop_unused_initializers,
    lift_constants,
    new_initializer,
    prepared,
    value_name,
)
from onnxforge.pipeline.prune.heads import find_attention_blocks, head_scores, heads_kept, prune_heads
from onnxforge.pipeline.prune.importance import Importance, activation_means, channel_importance
from onnxforge.pipeline.prune.repair import repair_model
from onnxforge.pipeline.user_metric import UserMetric

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


class Allocation(enum.Enum):
    UNIFORM = "uniform"  # every group loses the same share of its channels
    SENSITIVITY = "sensitivity"  # groups whose pruning hurts less lose more (scan on calibration data)


class Repair(enum.Enum):
    AUTO = "auto"  # least squares when calibration data is given, else none
    LEAST_SQUARES = "least-squares"
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class ChannelPruneConfig:
    ratio: float = option(0.5, help="fraction of channels to remove (0: none, with --head-ratio)")
    head_ratio: float = option(
        0.0,
        help="fraction of every attention block's heads to remove, whole heads (transformers, unfused export); "
        "0: none",
    )
    importance: Importance = option(Importance.L2, help="how channels are ranked")
    allocation: Allocation = option(
        Allocation.UNIFORM,
        help="the same ratio for every group, or per-group ratios from a sensitivity scan (needs calibration "
        "data)",
    )
    repair: Repair = option(
        Repair.AUTO,
        help="refit the next layers by least squares (auto: when calibration data is given)",
    )
    calibration_data: DataSpec | None = option(None, help="samples for the least-squares repair")
    calibration_samples: int = option(256, help="calibration samples fit at most")
    max_samples: int | None = option(  # bounds every use of the data: samples fit and eval samples scored
        None,
        help="bounds every use of the data: samples fit and eval samples scored",
    )
    positions: int = option(  # im2col rows sampled per calibration sample for the repair
        64,
        help="im2col rows sampled per calibration sample for the repair",
    )
    ridge: float = option(1e-3, help="ridge term of the least-squares repair")
    round_to: int | None = option(
        None,
        help="keep channel counts a multiple of this (default: the target's SIMD width, 8 on the CPU: odd counts "
        "ran ~2x slower at the same MACs); 1: no rounding. Layers narrower than it are not rounded",
    )
    exclude_nodes: tuple[str, ...] = option((), help="node names left dense")
    eval_data: DataSpec | None = option(
        None,
        help="held-out samples the quality gate scores (default: a share of the calibration samples)",
    )
    metric: UserMetric | Metric = option(Metric.AUTO, help=METRIC_HELP)
    tolerance: float | None = option(None, help="the quality gate, in the metric's unit")
    max_churn: float | None = option(None, help=MAX_CHURN_HELP)
    worst_cosine: float | None = option(None, help=WORST_COSINE_HELP)
    target: str = option("cpu", help="where the quality gate runs")  # where the quality gate runs
    # False: no tolerance loop; the ratio given is kept and its score reported (onnxforge optimize, which
    # varies the ratio and scores every trial on the eval data itself)
    gate: bool = option(True, help="back off until the quality gate holds (no: keep the ratio given)")
    objective: Objective = option(
        Objective.LATENCY,
        help="latency: a try measured slower than the input misses like a quality miss (exit 4 when every "
        "try does); size: smaller is the goal, speed is only reported",
    )

    def __post_init__(self) -> None:
        set_data_fields(self, "calibration_data", "eval_data")  # a str or Path from the Python API becomes a DataSpec
        if not (0.0 < self.ratio < 1.0 or (self.ratio == 0.0 and self.head_ratio > 0.0)):
            raise UsageError(f"--ratio {self.ratio}: must be in (0, 1), the fraction of channels to remove "
                             "(0 only with --head-ratio)")
        if not 0.0 <= self.head_ratio < 1.0:
            raise UsageError(f"--head-ratio {self.head_ratio}: must be in [0, 1), the fraction of heads to remove")
        if ((self.round_to is not None and self.round_to < 1) or self.calibration_samples < 1 or self.positions < 1
                or (self.max_samples is not None and self.max_samples < 1)):
            raise UsageError("round_to, calibration_samples, max_samples and positions must be at least 1")
        if self.ridge < 0:
            raise UsageError(f"ridge {self.ridge}: must be >= 0")
        if self.repair is Repair.LEAST_SQUARES and self.calibration_data is None:
            raise CalibrationDataError(
                "least-squares repair needs calibration data", hint="pass --calibration DATA.npz, or --repair none"
            )
        if self.allocation is Allocation.SENSITIVITY and self.calibration_data is None:
            raise CalibrationDataError(
                "the sensitivity scan needs calibration data",
                hint="pass --calibration DATA.npz, or --allocation uniform",
            )
        if self.importance is Importance.ACTIVATION and self.calibration_data is None:
            raise CalibrationDataError(
                "activation importance needs calibration data", hint="pass --calibration DATA.npz, or use l2"
            )

    @property
    def repairs(self) -> bool:
        return self.repair is not Repair.NONE and self.calibration_data is not None

    @property
    def channel_multiple(self) -> int:
        """What channel counts round to: ``round_to``, else the target's SIMD multiple."""
        if self.round_to is not None:
            return self.round_to
        from onnxforge.targets import get_target

        return get_target(self.target).channel_multiple


@dataclass
class PrunedModel:
    """A pruned model (not yet repaired) and what was done to it."""

    model: onnx.ModelProto
    groups: list[dict]
    pruned_layers: dict[str, str]  # producer layer -> "C -> C'"
    skipped_layers: dict[str, str]  # layer -> reason
    repair_layers: list[str]  # output names of layers whose input channels shrank, in graph order
    kept_outputs: dict[str, np.ndarray]  # value name -> kept channel positions (pruned values only)
    attention_heads: dict[str, int] = field(default_factory=dict)  # attention block -> heads before pruning


@dataclass
class ChannelPruneResult(JsonResult):
    """What prune_channels() did. The output path is not saved (the caller has it); the MAC ratio,
    the measured speedup and whether quality was measured are derived (``json_extra``)."""

    path: Path | None = field(metadata={"json": False})
    ratio: float
    groups: list[dict]
    pruned_layers: dict[str, str]
    skipped_layers: dict[str, str]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    repaired: bool
    repair_errors: dict[str, dict] = field(default_factory=dict)
    score_before: float | None = None
    score_without_repair: float | None = None
    score_after: float | None = None
    gate: str | None = None
    tried: list[dict] = field(default_factory=list)
    quality: str = ""  # what the scores rest on, or "quality NOT measured: ..."
    speed: dict | None = None  # input vs pruned, timed interleaved at the model's batch (QualityCheck.speedup)
    macs_shapes: dict | None = None  # the input shapes the MAC estimates were counted at
    notes: list[str] = field(default_factory=list)  # what was normalized on load
    head_ratio: float = 0.0

    def json_extra(self) -> dict[str, Any]:
        return {
            "quality_measured": self.score_after is not None,
            "measured_speedup": self.speed["speedup"] if self.speed else None,
            "macs_are_estimates": True,
            "macs_ratio": self.macs_before / self.macs_after if self.macs_after else None,
        }


def _grouped_input_cut(weight: np.ndarray, groups: int, kept: np.ndarray) -> np.ndarray:
    """A grouped Conv weight [Cout, Cin/G, ...] keeping input channels ``kept`` (equal count per block)."""
    per_block = weight.shape[1]
    out_per_block = weight.shape[0] // groups
    parts = []
    for g in range(groups):
        inside = kept[(kept >= g * per_block) & (kept < (g + 1) * per_block)] - g * per_block
        parts.append(np.take(weight[g * out_per_block : (g + 1) * out_per_block], inside, axis=1))
    return np.concatenate(parts, axis=0)


def _keep_count(channels: int, ratio: float, round_to: int) -> int:
    """Channels a group of ``channels`` keeps at ``ratio``: at least 1, at most ``channels``, rounded to a
    multiple of ``round_to`` (at least one multiple) unless the group is narrower than ``round_to``."""
    keep = max(1, channels - round(ratio * channels))
    if 1 < round_to <= channels:
        keep = max(round_to, round(keep / round_to) * round_to)
    return min(keep, channels)


def prune_model(
    model: onnx.ModelProto,
    config: ChannelPruneConfig,
    calibration: SampleSet | None = None,
    group_ratios: dict[int, float] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> PrunedModel:
    """Remove ``config.ratio`` of the channels of every prunable group (no repair). Input is not modified.

    ``group_ratios`` (ChannelGroup.id -> ratio, ids as listed in ``PrunedModel.groups``) overrides the
    uniform ratio; a group it does not name keeps all its channels. ``input_shapes`` (the data's, at
    batch 1) let shape inference follow dynamic dims (see ``prepared``).
    """
    model_ir = prepared(model, input_shapes)
    graph = model_ir.graph
    cg = find_channel_groups(graph, config.exclude_nodes)
    groups = cg.groups()
    prunable = {g.root: g.channels for g in groups if g.prunable and config.ratio > 0}
    blocks = find_attention_blocks(graph, config.exclude_nodes, required=not prunable) if config.head_ratio else []
    if not prunable and not blocks:
        raise UsageError(
            "prune-channels: no channel group can be pruned safely in this model",
            hint="; ".join(f"{k}: {v}" for k, v in list(cg.skipped.items())[:3])
            or "every group reaches an input, output or unknown op",
        )
    activations: dict[str, np.ndarray] = {}
    if config.importance is Importance.ACTIVATION:
        if calibration is None:
            raise CalibrationDataError("activation importance needs calibration data")
        activations = activation_means(cg, ir.to_proto(model_ir), calibration)
    scores = channel_importance(cg, prunable, config.importance, activations)
    heads = head_scores(blocks, ir.to_proto(model_ir), calibration, config.importance is Importance.ACTIVATION)
    ratio_of = {
        g.root: (group_ratios or {}).get(g.id, 0.0) if group_ratios is not None else config.ratio
        for g in groups
        if g.prunable
    }
    conv_blocks = {g.root: g.blocks for g in groups if g.prunable}
    round_to = config.channel_multiple
    keep = {}
    for root, n in prunable.items():
        if conv_blocks[root] == 1:
            keep[root] = np.sort(
                np.argsort(-scores[root], kind="stable")[: _keep_count(n, ratio_of[root], round_to)]
            )
            continue
        # a grouped Conv keeps its group count: the same number of channels survives in every block
        size = n // conv_blocks[root]
        per_block = _keep_count(size, ratio_of[root], 1)
        keep[root] = np.concatenate(
            [
                b * size + np.sort(np.argsort(-scores[root][b * size : (b + 1) * size], kind="stable")[:per_block])
                for b in range(conv_blocks[root])
            ]
        )
    # Gather every slice per (node, input) first: a Conv weight is cut on two axes by two groups.
    cuts: dict[tuple[int, int], tuple[ir.Node, int, dict[int, np.ndarray]]] = {}
    grouped_inputs: dict[tuple[int, int], int] = {}  # (node, input) -> G: axis 1 is cut block by block
    for p in cg.params:
        if not any(root in keep for root in cg.roots(p.ref)):
            continue  # nothing of this tensor's channels is pruned: its weights stay whole
        idx = cg.indices(p.ref, keep)
        if len(idx) == const_shape(p.node, p.index)[p.axis] * p.groups:
            continue
        cuts.setdefault((id(p.node), p.index), (p.node, p.index, {}))[2][p.axis] = idx
        if p.groups > 1:
            grouped_inputs[(id(p.node), p.index)] = p.groups
    counter = [0]
    for node, index, axes in cuts.values():
        old = const_input(node, index)
        array = const_array(node, index)
        groups_in = grouped_inputs.get((id(node), index))
        if groups_in is not None:
            array = _grouped_input_cut(array, groups_in, axes[1])  # before axis 0 reorders the blocks
        for axis, idx in axes.items():
            if groups_in is not None and axis == 1:
                continue
            array = np.take(array, idx, axis=axis)
        node.replace_input_with(index, new_initializer(graph, old, np.ascontiguousarray(array), counter))
    for node, ref in cg.group_attrs:
        node.attributes["group"] = ir.AttrInt64("group", len(cg.indices(ref, keep)))
    for node, position, ref in cg.shape_literals:
        old = const_input(node, 1)
        shape = const_array(node, 1).copy()
        shape[position] = len(cg.indices(ref, keep))
        node.replace_input_with(1, new_initializer(graph, old, shape, counter))
    kept_outputs: dict[str, np.ndarray] = {}
    for value, layout in cg.layouts.items():
        if value.name is not None and any(cg.find(g) in keep for g, _ in layout.segments):
            kept_outputs[value.name] = cg.indices(value, keep)
    head_layers: dict[str, str] = {}
    for block in blocks:
        count = heads_kept(block.heads, config.head_ratio)
        kept_heads = np.sort(np.argsort(-heads[block.name], kind="stable")[:count])
        if len(kept_heads) < block.heads:
            kept_outputs[value_name(block.merge.outputs[0])] = prune_heads(graph, block, kept_heads, counter)
            head_layers[block.name] = f"{block.heads} -> {len(kept_heads)} heads"
    drop_unused_initializers(graph)
    clear_inner_shapes(graph)
    pruned_proto = checked_model(
        model_ir, f"prune-channels: pruning {len(keep)} groups and {len(head_layers)} attention blocks produced an "
        "invalid model")

    pruned_layers = dict(head_layers)
    for g in groups:
        if g.root in keep and len(keep[g.root]) < g.channels:
            for name in g.producers:
                pruned_layers[name] = f"{g.channels} -> {len(keep[g.root])}"
    skipped = dict(cg.skipped)
    if config.head_ratio and not blocks:
        skipped["attention"] = "--head-ratio: no attention heads found in this model"
    for g in groups:
        if not g.prunable:
            for name in g.producers:
                skipped.setdefault(name, "; ".join(g.blocked) or "too few channels")
    repair_layers: list[str] = []
    consumers_pruned = {
        id(p.node)
        for p in cg.params
        if p.role == "consumer" and (id(p.node), p.index) in cuts and p.axis in cuts[(id(p.node), p.index)][2]
    }
    consumers_pruned |= {id(block.out) for block in blocks if block.name in head_layers}
    for node in graph:
        if id(node) in consumers_pruned and (output := node.outputs[0].name) is not None:
            repair_layers.append(output)
    return PrunedModel(
        model=pruned_proto,
        groups=[g.to_json() for g in groups],
        pruned_layers=pruned_layers,
        skipped_layers=skipped,
        repair_layers=repair_layers,
        kept_outputs=kept_outputs,
        attention_heads={block.name: block.heads for block in blocks},
    )


def sensitivity_ratios(
    model: onnx.ModelProto, config: ChannelPruneConfig, calibration: SampleSet, max_ratio: float = 0.9,
    progress: Progress = ignore,
) -> tuple[dict[int, float], dict[int, float]]:
    """Per-group ratios from a sensitivity scan: (ratios by group id, sensitivities by group id).

    Each prunable group alone is pruned at ``config.ratio`` (no repair) and its sensitivity s_g is
    the relative output error on the calibration samples. Ratios r_g ~ s_g^-1/2, scaled so that the
    channels removed in total equal ``config.ratio`` of all prunable channels (then clipped to
    ``max_ratio``): robust groups give up more, sensitive ones less.
    """
    shapes = _shapes_of(calibration)
    baseline = prune_model(model, config, calibration, group_ratios={}, input_shapes=shapes)
    prunable = {g["id"]: g["channels"] for g in baseline.groups if g["prunable"]}
    reference = _model_outputs(model, calibration)
    sensitivity = {}
    for gid in counted(progress, "sensitivity scan: groups scored", list(prunable), len(prunable)):
        probe = prune_model(model, config, calibration, group_ratios={gid: config.ratio}, input_shapes=shapes)
        out = _model_outputs(probe.model, calibration)
        sensitivity[gid] = float(np.linalg.norm(out - reference) / max(float(np.linalg.norm(reference)), 1e-12))
    weights = {gid: 1.0 / np.sqrt(s + 1e-6) for gid, s in sensitivity.items()}
    total = sum(prunable.values())
    scale = config.ratio * total / sum(weights[g] * prunable[g] for g in prunable)
    ratios = {gid: float(min(max_ratio, scale * weights[gid])) for gid in prunable}
    return ratios, sensitivity


def _shapes_of(samples: SampleSet | None) -> dict[str, tuple[int, ...]] | None:
    return None if samples is None else {k: tuple(v.shape) for k, v in samples.first_batch(1).items()}


def removes_any(groups: list[dict], ratio: float, round_to: int) -> bool:
    """Whether ``ratio`` removes at least one channel of some prunable group."""
    for g in groups:
        if not g["prunable"]:
            continue
        blocks = g.get("blocks", 1)
        size = g["channels"] // blocks
        if _keep_count(size, ratio, round_to if blocks == 1 else 1) < size:
            return True
    return False


def _model_outputs(model: onnx.ModelProto, samples: SampleSet) -> np.ndarray:
    name = model.graph.output[0].name
    chunks = [values[name] for _, values, _ in batches_of_values(model, samples, [name], 32)]
    return np.concatenate(chunks).astype(np.float64)


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
        group_ratios = None
        if attempt_config.allocation is Allocation.SENSITIVITY:
            group_ratios, _ = sensitivity_ratios(model, attempt_config, fit_samples(), progress=progress)
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
                "channels_removed": _channels_removed(pruned),
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
        return (tuple(_keep_count(g["channels"], ratio, round_to) for g in pruned.groups
                      if g["prunable"] and g.get("blocks", 1) == 1),
                tuple(heads_kept(h, head_ratio) for h in pruned.attention_heads.values()))

    def lower(strength: tuple[float, float], outcome: tuple) -> tuple[float, float] | None:
        tried_counts = kept_counts(strength, outcome[1])
        while True:
            ratio, head_ratio = (shrink(r) or 0.0 if r > 0 else 0.0 for r in strength)
            heads = any(heads_kept(h, head_ratio) < h for h in outcome[1].attention_heads.values())
            if not removes_any(outcome[1].groups, ratio, round_to) and not heads:
                return None  # a ratio that removes no channel and no head is not pruning: stop there
            strength = ratio, head_ratio
            # whole heads and rounded channel counts: a lower ratio may build the same model again
            if config.allocation is not Allocation.UNIFORM or kept_counts(strength, outcome[1]) != tried_counts:
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
            hint=f"loosen --tolerance (now {gate.describe_tolerance()}), pass --calibration for the "
            "least-squares repair, or --exclude sensitive layers",
            best_path=str(out),
            result=result.to_json(),
        )
    return result


def _channels_removed(pruned: PrunedModel) -> int:
    total = 0
    for change in pruned.pruned_layers.values():
        if change.endswith("heads"):
            continue
        before, after = (int(v) for v in change.split(" -> "))
        total += before - after
    return total
