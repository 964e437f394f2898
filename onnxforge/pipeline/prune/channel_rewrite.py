"""The graph edit of channel pruning: keep the most important channels of every group and slice every
coupled constant (see onnxforge.pipeline.prune.channels for the whole rule)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.errors import CalibrationDataError, UsageError
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.prune.channel_config import ChannelPruneConfig, PrunedModel
from onnxforge.pipeline.prune.coupling import find_channel_groups
from onnxforge.pipeline.prune.graph import (
    checked_model,
    clear_inner_shapes,
    const_array,
    const_input,
    const_shape,
    drop_unused_initializers,
    new_initializer,
    prepared,
    value_name,
)
from onnxforge.pipeline.prune.heads import find_attention_blocks, head_scores, heads_kept, prune_heads
from onnxforge.pipeline.prune.importance import Importance, activation_means, channel_importance

__all__ = ["channels_removed", "keep_count", "prune_model", "removes_any"]


def _grouped_input_cut(weight: np.ndarray, groups: int, kept: np.ndarray) -> np.ndarray:
    """A grouped Conv weight [Cout, Cin/G, ...] keeping input channels ``kept`` (equal count per block)."""
    per_block = weight.shape[1]
    out_per_block = weight.shape[0] // groups
    parts = []
    for g in range(groups):
        inside = kept[(kept >= g * per_block) & (kept < (g + 1) * per_block)] - g * per_block
        parts.append(np.take(weight[g * out_per_block : (g + 1) * out_per_block], inside, axis=1))
    return np.concatenate(parts, axis=0)


def keep_count(channels: int, ratio: float, round_to: int) -> int:
    """Channels a group of ``channels`` keeps at ``ratio``: at least 1, at most ``channels``, rounded to a
    multiple of ``round_to`` (at least one multiple) unless the group is narrower than ``round_to``. A
    ratio of 0 keeps every channel (rounding never prunes on its own)."""
    if ratio <= 0:
        return channels
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
                np.argsort(-scores[root], kind="stable")[: keep_count(n, ratio_of[root], round_to)]
            )
            continue
        # a grouped Conv keeps its group count: the same number of channels survives in every block
        size = n // conv_blocks[root]
        per_block = keep_count(size, ratio_of[root], 1)
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


def removes_any(groups: list[dict], ratio: float, round_to: int) -> bool:
    """Whether ``ratio`` removes at least one channel of some prunable group."""
    for g in groups:
        if not g["prunable"]:
            continue
        blocks = g.get("blocks", 1)
        size = g["channels"] // blocks
        if keep_count(size, ratio, round_to if blocks == 1 else 1) < size:
            return True
    return False


def channels_removed(pruned: PrunedModel) -> int:
    total = 0
    for change in pruned.pruned_layers.values():
        if change.endswith("heads"):
            continue
        before, after = (int(v) for v in change.split(" -> "))
        total += before - after
    return total
