"""Structured channel pruning on the ONNX graph, with least-squares repair from calibration data.

1. Groups: :func:`onnxforge.pipeline.channel_groups.find_channel_groups` ties every tensor dimension
   that must shrink together (Conv outputs, the bias/BN/elementwise ops that follow, both branches of
   a residual Add, Concat offsets, depthwise Convs, Flatten/Reshape into Gemm, consumers' inputs,
   MatMul -> Add(bias) -> Erf-GELU -> MatMul in transformer FFNs, with channels on the last axis).
   A group that passes through a grouped Conv (group G) keeps the same number of channels in each of
   its G blocks, so the Conv keeps ``group = G`` (its weight's input axis is cut block by block).
2. Importance of channel c in group G, summed over the group's weights W (producers' output slices
   and consumers' input slices), each weight normalized by its mean so no layer dominates:
   ``l1``: sum_W |W_c|_1 / mean_c |W_c|_1;  ``l2``: the same with |W_c|_2;
   ``activation``: sum over consumers of E|x_c| * |W[:, c]|_2 on calibration data (x_c = the
   consumer's input channel c), i.e. how much the channel actually contributes to the next layer.
3. Ratio R: each prunable group of C channels keeps the max(1, C - round(R_g*C)) most important ones
   (rounded to a multiple of ``round_to``), with R_g = R (``uniform``) or, with ``sensitivity``, R_g
   ~ s_g^-1/2 from a scan (s_g = output error when group g alone is pruned at R), scaled so the
   total share removed stays R; the rewrite slices every coupled constant,
   rewrites depthwise ``group`` attributes and Reshape shape literals, drops stale shapes and checks
   the result (onnx.checker + shape inference + an onnxruntime session).
4. Repair (He et al. 2017, layer-wise and in closed form): for every layer whose input channels were
   removed, in topological order, with X = its input in the *pruned* model (im2col patches for a
   Conv) and Y = its output in the *original* model (kept output channels), solve the ridge problem
   ``min_W ||[X 1] W - Y||^2 + lam ||W - W0||^2`` where W0 is the sliced weight and bias and
   ``lam = a * trace(X'X) / d``:  ``W = (X'X + lam I)^-1 (X'Y + lam W0)``. ``a`` is picked from
   ``ridge * 10^k`` (k = 0..5) by the error on every 4th calibration sample, held out of the fit
   (the errors reported are on those held-out rows); a refit that does not lower that error is not
   applied. Rows are sampled (``positions`` per sample) and X'X is accumulated in batches, so
   memory stays small.

Then, with evaluation data, the tolerance loop: try R, back off x0.75 until the quality gate holds,
keep the most-pruned model that passes (QualityGateError, exit 4, when none does).
"""

from __future__ import annotations

import enum
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.errors import CalibrationDataError, InvalidModelError, QualityGateError, UsageError
from onnxforge.model_io import input_specs, load_model, save_model
from onnxforge.pipeline.calibration import SampleSet, load_samples, model_batch_size
from onnxforge.pipeline.channel_groups import ChannelGroups, ParamSlice, find_channel_groups
from onnxforge.pipeline.evaluate import Metric, QualityBaseline, run_outputs, score
from onnxforge.targets import get_target
from onnxforge.targets.cpu import CpuTarget

__all__ = [
    "Importance",
    "Allocation",
    "Repair",
    "ChannelPruneConfig",
    "ChannelPruneResult",
    "PrunedModel",
    "prune_channels",
    "prune_model",
    "repair_model",
    "sensitivity_ratios",
    "count_params_and_macs",
]


class Importance(enum.Enum):
    L1 = "l1"
    L2 = "l2"
    ACTIVATION = "activation"


class Allocation(enum.Enum):
    UNIFORM = "uniform"  # every group loses the same share of its channels
    SENSITIVITY = "sensitivity"  # groups whose pruning hurts less lose more (scan on calibration data)


class Repair(enum.Enum):
    AUTO = "auto"  # least squares when calibration data is given, else none
    LEAST_SQUARES = "least-squares"
    NONE = "none"


@dataclass(frozen=True, kw_only=True)
class ChannelPruneConfig:
    ratio: float = 0.5
    importance: Importance = Importance.L2
    allocation: Allocation = Allocation.UNIFORM
    repair: Repair = Repair.AUTO
    calibration_data: Path | None = None
    calibration_samples: int = 256
    positions: int = 64  # im2col rows sampled per calibration sample for the repair
    ridge: float = 1e-3
    round_to: int = 1
    exclude_nodes: tuple[str, ...] = ()
    eval_data: Path | None = None
    metric: Metric = Metric.AUTO
    tolerance: float | None = None
    target: str = "cpu"  # where the quality gate runs

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio {self.ratio}: must be in (0, 1), the fraction of channels to remove")
        if self.round_to < 1 or self.calibration_samples < 1 or self.positions < 1:
            raise UsageError("round_to, calibration_samples and positions must be at least 1")
        if self.ridge < 0:
            raise UsageError(f"ridge {self.ridge}: must be >= 0")
        if self.repair is Repair.LEAST_SQUARES and self.calibration_data is None:
            raise CalibrationDataError(
                "least-squares repair needs calibration data", hint="pass --calibration DATA.npz, or --repair none"
            )
        if self.allocation is Allocation.SENSITIVITY and self.calibration_data is None:
            raise CalibrationDataError(
                "the sensitivity scan needs calibration data", hint="pass --calibration DATA.npz, or --allocation uniform"
            )
        if self.importance is Importance.ACTIVATION and self.calibration_data is None:
            raise CalibrationDataError(
                "activation importance needs calibration data", hint="pass --calibration DATA.npz, or use l2"
            )

    @property
    def repairs(self) -> bool:
        return self.repair is not Repair.NONE and self.calibration_data is not None



@dataclass
class PrunedModel:
    """A pruned model (not yet repaired) and what was done to it."""

    model: onnx.ModelProto
    groups: list[dict]
    pruned_layers: dict[str, str]  # producer layer -> "C -> C'"
    skipped_layers: dict[str, str]  # layer -> reason
    repair_layers: list[str]  # output names of layers whose input channels shrank, in graph order
    kept_outputs: dict[str, np.ndarray]  # value name -> kept channel positions (pruned values only)


@dataclass
class ChannelPruneResult:
    path: Path | None
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

    def to_json(self) -> dict:
        return {
            "ratio": self.ratio,
            "groups": self.groups,
            "pruned_layers": self.pruned_layers,
            "skipped_layers": self.skipped_layers,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_before / self.macs_after if self.macs_after else None,
            "repaired": self.repaired,
            "repair_errors": self.repair_errors,
            "score_before": self.score_before,
            "score_without_repair": self.score_without_repair,
            "score_after": self.score_after,
            "gate": self.gate,
            "tried": self.tried,
        }


# ------------------------------------------------------------------------------------------------
# Running intermediate values


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """``model`` whose outputs are the values ``names`` (types from shape inference, default float)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = [*copy.graph.value_info, *copy.graph.output, *copy.graph.input]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in known}
    del copy.graph.output[:]
    for name in names:
        elem_type = types.get(name) or onnx.TensorProto.FLOAT
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return copy.SerializeToString()


def _batches_of_values(
    model: onnx.ModelProto, samples: SampleSet, names: list[str], batch: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first sample index, {name: value}) for each full batch of ``samples``."""
    session = CpuTarget().session(_with_outputs(model, names))
    fixed = model_batch_size(input_specs(model), preferred=-1)
    batch = fixed if fixed > 0 else batch
    for start, feeds in zip(range(0, len(samples), batch), samples.batches(batch)):
        n = len(next(iter(feeds.values())))
        if fixed > 0 and n != fixed:
            continue  # a fixed-batch model cannot take a short last batch
        yield start, dict(zip(names, session.run(names, feeds)))


def _channel_means(values: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """(sum of |values| per position along ``axis``, number of terms in each sum)."""
    moved = np.moveaxis(np.abs(values.astype(np.float64)), axis, -1)
    return moved.reshape(-1, moved.shape[-1]).sum(0), moved.size // moved.shape[-1]


# ------------------------------------------------------------------------------------------------
# Importance and the rewrite


def _slice_norms(array: np.ndarray, axis: int, kind: Importance) -> np.ndarray:
    moved = np.moveaxis(array.astype(np.float64), axis, 0).reshape(array.shape[axis], -1)
    return np.abs(moved).sum(1) if kind is Importance.L1 else np.sqrt((moved**2).sum(1))


def _param_norms(p: ParamSlice, weight: np.ndarray, kind: Importance) -> np.ndarray:
    """Norm per channel of ``p.ref`` of the weight slices that read or write it."""
    if p.groups == 1:
        return _slice_norms(weight, p.axis, kind)
    # grouped Conv input axis: channel g*Cg + j is read by weight[block g outputs, j]
    blocks = weight.reshape(p.groups, weight.shape[0] // p.groups, weight.shape[1], -1).astype(np.float64)
    if kind is Importance.L1:
        return np.abs(blocks).sum(axis=(1, 3)).ravel()
    return np.sqrt((blocks**2).sum(axis=(1, 3))).ravel()


def _grouped_input_cut(weight: np.ndarray, groups: int, kept: np.ndarray) -> np.ndarray:
    """A grouped Conv weight [Cout, Cin/G, ...] keeping input channels ``kept`` (equal count per block)."""
    per_block = weight.shape[1]
    out_per_block = weight.shape[0] // groups
    parts = []
    for g in range(groups):
        inside = kept[(kept >= g * per_block) & (kept < (g + 1) * per_block)] - g * per_block
        parts.append(np.take(weight[g * out_per_block : (g + 1) * out_per_block], inside, axis=1))
    return np.concatenate(parts, axis=0)


def _scatter(cg: ChannelGroups, ref: ir.Value, per_position: np.ndarray, scores: dict[int, np.ndarray]) -> None:
    """Add per-position values along ``ref``'s channel axis to the scores of its groups' channels."""
    layout = cg.layouts[ref]
    offset = 0
    for gid, n in layout.segments:
        root = cg.find(gid)
        part = per_position[offset * layout.expand : (offset + n) * layout.expand].reshape(n, layout.expand).sum(1)
        if root in scores and len(part) == len(scores[root]):
            scores[root] += part
        offset += n


def _importance(
    cg: ChannelGroups, roots: dict[int, int], config: ChannelPruneConfig, activations: dict[str, np.ndarray]
) -> dict[int, np.ndarray]:
    scores = {root: np.zeros(channels) for root, channels in roots.items()}
    for p in cg.params:
        if not any(cg.find(g) in roots for g, _ in cg.layouts[p.ref].segments):
            continue
        weight = p.node.inputs[p.index].const_value.numpy()
        if config.importance is Importance.ACTIVATION:
            if p.role != "consumer":
                continue
            column = _param_norms(p, weight, Importance.L2)
            contribution = activations[p.ref.name] * column
        else:
            if p.role == "follower":
                continue
            contribution = _param_norms(p, weight, config.importance)
        mean = contribution.mean()
        _scatter(cg, p.ref, contribution / mean if mean > 0 else contribution, scores)
    return scores


def _keep_count(channels: int, ratio: float, round_to: int) -> int:
    keep = max(1, channels - int(round(ratio * channels)))
    if round_to > 1:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return min(keep, channels)


def _new_initializer(graph: ir.Graph, like: ir.Value, array: np.ndarray, counter: list[int]) -> ir.Value:
    counter[0] += 1
    name = f"{like.name}__pruned{counter[0]}"
    while name in graph.initializers:
        counter[0] += 1
        name = f"{like.name}__pruned{counter[0]}"
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(like.dtype), const_value=ir.tensor(array, name=name)
    )
    graph.register_initializer(value)
    return value


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


def _checked(model_ir: ir.Model, what: str) -> onnx.ModelProto:
    proto = ir.to_proto(model_ir)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
        CpuTarget().session(proto.SerializeToString())
    except Exception as e:
        raise InvalidModelError(f"prune-channels: {what} produced an invalid model: {e}") from e
    return proto


def _prepared(model: onnx.ModelProto) -> ir.Model:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise InvalidModelError(f"prune-channels: shape inference failed: {e}") from e
    model_ir = ir.from_proto(inferred)
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model_ir)
    model_ir.graph.sort()
    return model_ir


def prune_model(
    model: onnx.ModelProto,
    config: ChannelPruneConfig,
    calibration: SampleSet | None = None,
    group_ratios: dict[int, float] | None = None,
) -> PrunedModel:
    """Remove ``config.ratio`` of the channels of every prunable group (no repair). Input is not modified.

    ``group_ratios`` (ChannelGroup.id -> ratio, ids as listed in ``PrunedModel.groups``) overrides the
    uniform ratio; a group it does not name keeps all its channels.
    """
    model_ir = _prepared(model)
    graph = model_ir.graph
    cg = find_channel_groups(graph, config.exclude_nodes)
    groups = cg.groups()
    prunable = {g.root: g.channels for g in groups if g.prunable}
    if not prunable:
        raise UsageError(
            "prune-channels: no channel group can be pruned safely in this model",
            hint="; ".join(f"{k}: {v}" for k, v in list(cg.skipped.items())[:3])
            or "every group reaches an input, output or unknown op",
        )
    activations: dict[str, np.ndarray] = {}
    if config.importance is Importance.ACTIVATION:
        if calibration is None:
            raise CalibrationDataError("activation importance needs calibration data")
        refs = list(dict.fromkeys(p.ref for p in cg.params if p.role == "consumer"))
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        proto = ir.to_proto(model_ir)
        for _, values in _batches_of_values(proto, calibration, [r.name for r in refs], 32):
            for ref in refs:
                total, count = _channel_means(values[ref.name], cg.layouts[ref].axis)
                sums[ref.name] = sums.get(ref.name, 0) + total
                counts[ref.name] = counts.get(ref.name, 0) + count
        activations = {name: sums[name] / max(counts[name], 1) for name in sums}
    scores = _importance(cg, prunable, config, activations)
    ratio_of = {g.root: (group_ratios or {}).get(g.id, 0.0) if group_ratios is not None else config.ratio
                for g in groups if g.prunable}
    blocks = {g.root: g.blocks for g in groups if g.prunable}
    keep = {}
    for root, n in prunable.items():
        if blocks[root] == 1:
            keep[root] = np.sort(np.argsort(-scores[root], kind="stable")[: _keep_count(n, ratio_of[root], config.round_to)])
            continue
        # a grouped Conv keeps its group count: the same number of channels survives in every block
        size = n // blocks[root]
        per_block = _keep_count(size, ratio_of[root], 1)
        keep[root] = np.concatenate([
            b * size + np.sort(np.argsort(-scores[root][b * size : (b + 1) * size], kind="stable")[:per_block])
            for b in range(blocks[root])
        ])
    # Gather every slice per (node, input) first: a Conv weight is cut on two axes by two groups.
    cuts: dict[tuple[int, int], tuple[ir.Node, int, dict[int, np.ndarray]]] = {}
    grouped_inputs: dict[tuple[int, int], int] = {}  # (node, input) -> G: axis 1 is cut block by block
    for p in cg.params:
        idx = cg.indices(p.ref, keep)
        weight = p.node.inputs[p.index]
        if len(idx) == weight.const_value.shape[p.axis] * p.groups:
            continue
        cuts.setdefault((id(p.node), p.index), (p.node, p.index, {}))[2][p.axis] = idx
        if p.groups > 1:
            grouped_inputs[(id(p.node), p.index)] = p.groups
    counter = [0]
    for node, index, axes in cuts.values():
        old = node.inputs[index]
        array = old.const_value.numpy()
        groups_in = grouped_inputs.get((id(node), index))
        if groups_in is not None:
            array = _grouped_input_cut(array, groups_in, axes[1])  # before axis 0 reorders the blocks
        for axis, idx in axes.items():
            if groups_in is not None and axis == 1:
                continue
            array = np.take(array, idx, axis=axis)
        node.replace_input_with(index, _new_initializer(graph, old, np.ascontiguousarray(array), counter))
    for node, ref in cg.group_attrs:
        node.attributes["group"] = ir.AttrInt64("group", len(cg.indices(ref, keep)))
    for node, position, ref in cg.shape_literals:
        old = node.inputs[1]
        shape = old.const_value.numpy().copy()
        shape[position] = len(cg.indices(ref, keep))
        node.replace_input_with(1, _new_initializer(graph, old, shape, counter))
    kept_outputs = {}
    for value, layout in cg.layouts.items():
        if any(cg.find(g) in keep for g, _ in layout.segments):
            kept_outputs[value.name] = cg.indices(value, keep)
    _drop_unused_initializers(graph)
    for node in graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None  # stale: shape inference recomputes them
    pruned_proto = _checked(model_ir, f"pruning {len(keep)} groups")

    pruned_layers = {}
    for g in groups:
        if g.root in keep and len(keep[g.root]) < g.channels:
            for name in g.producers:
                pruned_layers[name] = f"{g.channels} -> {len(keep[g.root])}"
    skipped = dict(cg.skipped)
    for g in groups:
        if not g.prunable:
            for name in g.producers:
                skipped.setdefault(name, "; ".join(g.blocked) or "too few channels")
    repair_layers = []
    consumers_pruned = {id(p.node) for p in cg.params if p.role == "consumer" and (id(p.node), p.index) in cuts
                        and p.axis in cuts[(id(p.node), p.index)][2]}
    for node in graph:
        if id(node) in consumers_pruned:
            repair_layers.append(node.outputs[0].name)
    return PrunedModel(
        model=pruned_proto,
        groups=[g.to_json() for g in groups],
        pruned_layers=pruned_layers,
        skipped_layers=skipped,
        repair_layers=repair_layers,
        kept_outputs=kept_outputs,
    )


def sensitivity_ratios(
    model: onnx.ModelProto, config: ChannelPruneConfig, calibration: SampleSet, max_ratio: float = 0.9
) -> tuple[dict[int, float], dict[int, float]]:
    """Per-group ratios from a sensitivity scan: (ratios by group id, sensitivities by group id).

    Each prunable group alone is pruned at ``config.ratio`` (no repair) and its sensitivity s_g is
    the relative output error on the calibration samples. Ratios r_g ~ s_g^-1/2, scaled so that the
    channels removed in total equal ``config.ratio`` of all prunable channels (then clipped to
    ``max_ratio``): robust groups give up more, sensitive ones less.
    """
    baseline = prune_model(model, config, calibration, group_ratios={})
    prunable = {g["id"]: g["channels"] for g in baseline.groups if g["prunable"]}
    reference = _model_outputs(model, calibration)
    sensitivity = {}
    for gid in prunable:
        probe = prune_model(model, config, calibration, group_ratios={gid: config.ratio})
        out = _model_outputs(probe.model, calibration)
        sensitivity[gid] = float(np.linalg.norm(out - reference) / max(np.linalg.norm(reference), 1e-12))
    weights = {gid: 1.0 / np.sqrt(s + 1e-6) for gid, s in sensitivity.items()}
    total = sum(prunable.values())
    scale = config.ratio * total / sum(weights[g] * prunable[g] for g in prunable)
    ratios = {gid: float(min(max_ratio, scale * weights[gid])) for gid in prunable}
    return ratios, sensitivity


def _model_outputs(model: onnx.ModelProto, samples: SampleSet) -> np.ndarray:
    name = model.graph.output[0].name
    chunks = [values[name] for _, values in _batches_of_values(model, samples, [name], 32)]
    return np.concatenate(chunks).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# Least-squares repair


def _im2col_rows(x: np.ndarray, node: ir.Node, kernel: tuple[int, int], rows: np.ndarray) -> np.ndarray:
    """Patches [N*P, C*kh*kw] of a 2-D Conv's input at output positions ``rows`` ([N, P] flat indices)."""
    pads = list(node.attributes["pads"].value) if "pads" in node.attributes else [0, 0, 0, 0]
    strides = list(node.attributes["strides"].value) if "strides" in node.attributes else [1, 1]
    dilations = list(node.attributes["dilations"].value) if "dilations" in node.attributes else [1, 1]
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    windows = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, c, ho, wo = windows.shape[:4]
    flat = windows.reshape(n, c, ho * wo, kh * kw)
    picked = flat[np.arange(n)[:, None], :, rows]  # [N, P, C, kh*kw]
    return picked.reshape(n * rows.shape[1], c * kh * kw)


def _weight_matrix(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's weights as [d, out] (x @ W = y) and its bias [out] (None when absent)."""
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    bias = None if b is None else b.const_value.numpy().astype(np.float64).ravel()
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T, bias
    if node.op_type == "Gemm":
        return (w.T if node.attributes.get("transB") and node.attributes["transB"].value else w), bias
    return w, None


def _set_weights(
    graph: ir.Graph, node: ir.Node, matrix: np.ndarray, bias: np.ndarray | None, counter: list[int]
) -> None:
    w_old = node.inputs[1]
    shape = w_old.const_value.shape
    if node.op_type == "Conv":
        w = matrix.T.reshape(tuple(shape))
    elif node.op_type == "Gemm" and node.attributes.get("transB") and node.attributes["transB"].value:
        w = matrix.T
    else:
        w = matrix
    node.replace_input_with(1, _new_initializer(graph, w_old, w.astype(np.float32), counter))
    if bias is not None:
        b_old = node.inputs[2]
        new_b = bias.reshape(tuple(b_old.const_value.shape)).astype(np.float32)
        node.replace_input_with(2, _new_initializer(graph, b_old, new_b, counter))


def _repairable(node: ir.Node) -> str | None:
    """None when the layer can be refit, else why not."""
    if node.op_type == "Conv":
        if int(node.attributes["group"].value if "group" in node.attributes else 1) != 1:
            return "grouped Conv"
        if len(node.inputs[1].const_value.shape) != 4:
            return "only 2-D Convs are refit"
        auto_pad = node.attributes.get("auto_pad")
        if auto_pad is not None and auto_pad.value not in ("NOTSET", b"NOTSET"):
            return "auto_pad"
        return None
    if node.op_type == "Gemm":
        alpha = node.attributes["alpha"].value if "alpha" in node.attributes else 1.0
        beta = node.attributes["beta"].value if "beta" in node.attributes else 1.0
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        trans_b = bool(node.attributes.get("transB") and node.attributes["transB"].value)
        outputs = node.inputs[1].const_value.shape[0 if trans_b else 1]
        if alpha != 1.0 or (bias is not None and (beta != 1.0 or bias.const_value.size != outputs)):
            return "Gemm with alpha/beta != 1 or a broadcast bias"
        return None
    if node.op_type == "MatMul":
        return None
    return f"{node.op_type} is not refit"


def _rows_for(name: str, start: int, n: int, positions: int, total: int) -> np.ndarray:
    """[n, P] output positions sampled for samples start..start+n (deterministic per layer)."""
    p = min(positions, total)
    rng = np.random.default_rng(zlib.crc32(f"{name}:{start}".encode()))
    if p == total:
        return np.tile(np.arange(total), (n, 1))
    return np.stack([rng.choice(total, p, replace=False) for _ in range(n)])


def _layer_rows(node: ir.Node, x: np.ndarray, name: str, start: int, positions: int, out_spatial: tuple[int, ...]):
    """(X rows [R, d], row selector to apply to the layer's output)."""
    if node.op_type == "Conv":
        total = int(np.prod(out_spatial))
        rows = _rows_for(name, start, x.shape[0], positions, total)
        kernel = tuple(node.inputs[1].const_value.shape[2:])
        return _im2col_rows(x, node, kernel, rows), rows
    flat = x.reshape(-1, x.shape[-1])
    return flat, None


def _output_rows(y: np.ndarray, op: str, rows: np.ndarray | None) -> np.ndarray:
    if op == "Conv":
        n, c = y.shape[:2]
        flat = y.reshape(n, c, -1)
        return flat[np.arange(n)[:, None], :, rows].reshape(-1, c)  # [N, P, C] -> rows
    return y.reshape(-1, y.shape[-1])


def repair_model(
    original: onnx.ModelProto, pruned: PrunedModel, calibration: SampleSet, config: ChannelPruneConfig
) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """Refit each layer whose inputs shrank so its output matches ``original``'s; returns (model, errors).

    ``errors[layer]`` holds the relative squared output error on the sampled calibration rows before
    and after the refit (``{"before": e0, "after": e1}``), or ``{"skipped": reason}``.
    """
    model_ir = _prepared(pruned.model)
    graph = model_ir.graph
    producers = {node.outputs[0].name: node for node in graph if node.outputs}
    reference = onnx.shape_inference.infer_shapes(original)
    batch = 32
    errors: dict[str, dict] = {}
    counter = [0]
    # The original layers' outputs on the calibration rows, collected once.
    targets = [name for name in pruned.repair_layers if name in producers]
    y_chunks: dict[str, list[np.ndarray]] = {name: [] for name in targets}
    for _, values in _batches_of_values(reference, calibration, targets, batch):
        for name in targets:
            y_chunks[name].append(values[name])
    for name in targets:
        node = producers[name]
        reason = _repairable(node)
        if reason:
            errors[name] = {"skipped": reason}
            continue
        w0, b0 = _weight_matrix(node)
        kept = pruned.kept_outputs.get(name)
        w0_full = np.vstack([w0, b0[None, :]]) if b0 is not None else w0
        d = w0_full.shape[0]
        # normal equations per fold: every 4th calibration sample is held out to pick the ridge
        stats = {fold: [np.zeros((d, d)), np.zeros((d, w0_full.shape[1])), 0.0] for fold in ("fit", "check")}
        current = ir.to_proto(model_ir)
        inputs = _batches_of_values(current, calibration, [node.inputs[0].name], batch)
        for (start, values), y in zip(inputs, y_chunks[name]):
            x = values[node.inputs[0].name]
            if kept is not None:
                y = np.take(y, kept, axis=1 if node.op_type in ("Conv", "Gemm") else -1)
            xr, rows = _layer_rows(node, x, name, start, config.positions, y.shape[2:])
            yr = _output_rows(y, node.op_type, rows).astype(np.float64)
            xr = xr.astype(np.float64)
            if b0 is not None:
                xr = np.hstack([xr, np.ones((len(xr), 1))])
            sample = start + np.arange(len(xr)) // (len(xr) // len(x))
            for fold, mask in (("fit", sample % 4 != 3), ("check", sample % 4 == 3)):
                stats[fold][0] += xr[mask].T @ xr[mask]
                stats[fold][1] += xr[mask].T @ yr[mask]
                stats[fold][2] += float((yr[mask] ** 2).sum())
        gram = stats["fit"][0] + stats["check"][0]
        cross = stats["fit"][1] + stats["check"][1]
        if stats["fit"][2] + stats["check"][2] == 0.0:
            errors[name] = {"skipped": "no calibration rows"}
            continue
        check = stats["check"] if stats["check"][2] > 0 else [gram, cross, stats["fit"][2]]

        def rel_error(w: np.ndarray, held: list = check) -> float:
            # ||XW - Y||^2 = tr(W'GW) - 2 tr(W'C) + ||Y||^2, on the held-out rows
            g, c, y_sq = held
            return float((np.einsum("ij,ik,kj->", w, g, w) - 2 * np.sum(w * c) + y_sq) / y_sq)

        def solve(g: np.ndarray, c: np.ndarray, strength: float) -> np.ndarray:
            regularizer = strength * np.trace(g) / d * np.eye(d)
            if b0 is not None:
                regularizer[-1, -1] = 0.0  # the bias is not shrunk
            try:
                return np.linalg.solve(g + regularizer + 1e-12 * np.eye(d), c + regularizer @ w0_full)
            except np.linalg.LinAlgError:
                return np.linalg.lstsq(g + regularizer, c + regularizer @ w0_full, rcond=None)[0]

        strengths = [config.ridge * 10.0**k for k in range(6)] if config.ridge > 0 else [0.0]
        if stats["check"][2] > 0 and len(strengths) > 1:
            strength = min(strengths, key=lambda a: rel_error(solve(stats["fit"][0], stats["fit"][1], a)))
            before, after = rel_error(w0_full), rel_error(solve(stats["fit"][0], stats["fit"][1], strength))
        else:
            strength = strengths[0]
            before, after = rel_error(w0_full), rel_error(solve(gram, cross, strength))
        if not after < before:
            errors[name] = {"before": before, "after": before, "kept_original": True}
            continue
        solution = solve(gram, cross, strength)  # refit on all rows with the chosen ridge
        _set_weights(graph, node, solution[: w0.shape[0]], solution[-1] if b0 is not None else None, counter)
        errors[name] = {"before": before, "after": after, "ridge": strength}
    _drop_unused_initializers(graph)
    return _checked(model_ir, "the least-squares repair"), errors


# ------------------------------------------------------------------------------------------------
# Cost


def count_params_and_macs(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, multiply-accumulates per sample) of Conv/ConvTranspose/Gemm/MatMul layers."""
    inferred = onnx.shape_inference.infer_shapes(model)
    inits = {t.name: tuple(t.dims) for t in inferred.graph.initializer}
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    params = int(sum(int(np.prod(dims, dtype=np.int64)) for dims in inits.values()))
    macs = 0
    for node in inferred.graph.node:
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        size = int(np.prod(inits[node.input[1]], dtype=np.int64))
        if node.op_type == "Conv":
            spatial = shapes.get(node.output[0], [])[2:]
            macs += size * int(np.prod([d or 1 for d in spatial], dtype=np.int64))
        elif node.op_type == "ConvTranspose":
            spatial = shapes.get(node.input[0], [])[2:]
            macs += size * int(np.prod([d or 1 for d in spatial], dtype=np.int64))
        elif node.op_type == "Gemm":
            macs += size
        elif node.op_type == "MatMul":
            middle = shapes.get(node.output[0], [])[1:-1]
            macs += size * int(np.prod([d or 1 for d in middle], dtype=np.int64))
    return params, macs


# ------------------------------------------------------------------------------------------------
# The stage


def prune_channels(
    input_path: str | os.PathLike, output: str | os.PathLike, config: ChannelPruneConfig = ChannelPruneConfig()
) -> ChannelPruneResult:
    """Prune ``input_path``'s channels into ``output``; with ``eval_data``, lower the ratio until the gate holds.

    Measured and returned: the groups found, pruned and skipped layers with reasons, parameters and
    MACs before/after, the per-layer repair errors, and (with eval data) the score of the original, of
    the pruned model without repair and of the saved model.
    """
    out = check_output_path(output, input_path, *paths_in(config))
    model = load_model(input_path)
    specs = input_specs(model)
    calibration = None
    if config.calibration_data is not None:
        calibration = load_samples(config.calibration_data, specs)
        calibration = calibration.take(slice(0, config.calibration_samples))
    target = get_target(config.target)
    batch = model_batch_size(specs, preferred=32)
    samples = gate = reference = fp_score = None
    if config.eval_data is not None:
        baseline = QualityBaseline.measure(model, config.eval_data, config.metric, config.tolerance, target)
        samples, reference, gate, fp_score = baseline.samples, baseline.reference, baseline.gate, baseline.score

    def evaluate(candidate: onnx.ModelProto) -> float | None:
        if samples is None:
            return None
        outputs = run_outputs(target.session(candidate.SerializeToString()), samples, batch)
        return score(gate.metric, outputs, reference, samples.labels)

    params_before, macs_before = count_params_and_macs(model)
    tried: list[dict] = []
    best = None
    ratio = config.ratio
    while True:
        attempt = ChannelPruneConfig(**{**config.__dict__, "ratio": ratio})
        group_ratios = None
        if attempt.allocation is Allocation.SENSITIVITY:
            group_ratios, _ = sensitivity_ratios(model, attempt, calibration)
        pruned = prune_model(model, attempt, calibration, group_ratios)
        candidate, repair_errors = pruned.model, {}
        unrepaired_score = evaluate(candidate)
        if attempt.repairs:
            candidate, repair_errors = repair_model(model, pruned, calibration, attempt)
        value = evaluate(candidate) if attempt.repairs else unrepaired_score
        passes = samples is None or gate.passes(value, fp_score)
        tried.append(
            {"ratio": round(ratio, 4), "score_without_repair": unrepaired_score, "score": value, "passes": passes}
        )
        if group_ratios is not None:
            tried[-1]["group_ratios"] = {str(k): round(v, 4) for k, v in group_ratios.items()}
        if best is None or passes:
            best = (ratio, pruned, candidate, repair_errors, unrepaired_score, value)
        if passes or ratio * 0.75 < 0.05:
            break
        ratio *= 0.75
    ratio, pruned, candidate, repair_errors, unrepaired_score, value = best
    passed = samples is None or gate.passes(value, fp_score)
    if not passed:
        candidate, value = model, fp_score
    save_model(candidate, out)
    params_after, macs_after = count_params_and_macs(candidate)
    result = ChannelPruneResult(
        path=out,
        ratio=ratio if passed else 0.0,
        groups=pruned.groups,
        pruned_layers=pruned.pruned_layers if passed else {},
        skipped_layers=pruned.skipped_layers,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        repaired=config.repairs and passed,
        repair_errors=repair_errors,
        score_before=fp_score,
        score_without_repair=unrepaired_score,
        score_after=value,
        gate=gate.describe() if gate else None,
        tried=tried,
    )
    if not passed:
        raise QualityGateError(
            f"no channel ratio down to {tried[-1]['ratio']:.3f} meets the tolerance ({gate.describe()}); "
            f"the unpruned model is saved at {out}",
            hint="loosen --tolerance, pass --calibration for the least-squares repair, or --exclude sensitive layers",
            best_path=str(out),
        )
    return result
