"""Which channels of a channel group go first.

Rule: the importance of channel c in group G is summed over the group's weights W (producers'
output slices and consumers' input slices), each weight normalized by its mean so no layer
dominates: ``l1``: sum_W |W_c|_1 / mean_c |W_c|_1;  ``l2``: the same with |W_c|_2;
``activation``: sum over consumers of E|x_c| * |W[:, c]|_2 on calibration data (x_c = the
consumer's input channel c), i.e. how much the channel actually contributes to the next layer.
"""

from __future__ import annotations

import enum

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.prune.activations import batches_of_values, token_rows
from onnxforge.pipeline.prune.channel_groups import ChannelGroups, ParamSlice
from onnxforge.pipeline.prune.graph import const_array, value_name

__all__ = ["Importance", "activation_means", "channel_importance"]


class Importance(enum.Enum):
    L1 = "l1"
    L2 = "l2"
    ACTIVATION = "activation"


def _channel_means(values: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """(sum of |values| per position along ``axis``, number of terms in each sum)."""
    moved = np.moveaxis(np.abs(values.astype(np.float64)), axis, -1)
    return moved.reshape(-1, moved.shape[-1]).sum(0), moved.size // moved.shape[-1]


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


def channel_importance(
    cg: ChannelGroups, roots: dict[int, int], kind: Importance, activations: dict[str, np.ndarray]
) -> dict[int, np.ndarray]:
    """Importance of each channel of the groups ``roots`` (root -> channels), by ``kind`` (see module doc).

    ``activations`` (consumer input name -> E|x_c| per channel) is read for ``Importance.ACTIVATION``.
    """
    scores = {root: np.zeros(channels) for root, channels in roots.items()}
    for p in cg.params:
        if not any(cg.find(g) in roots for g, _ in cg.layouts[p.ref].segments):
            continue
        weight = const_array(p.node, p.index)
        if kind is Importance.ACTIVATION:
            if p.role != "consumer":
                continue
            column = _param_norms(p, weight, Importance.L2)
            contribution = activations[value_name(p.ref)] * column
        else:
            if p.role == "follower":
                continue
            contribution = _param_norms(p, weight, kind)
        mean = contribution.mean()
        _scatter(cg, p.ref, contribution / mean if mean > 0 else contribution, scores)
    return scores


def activation_means(cg: ChannelGroups, model: onnx.ModelProto, calibration: SampleSet) -> dict[str, np.ndarray]:
    """E|x_c| per channel of every consumer's input, over the calibration samples."""
    refs = list(dict.fromkeys(p.ref for p in cg.params if p.role == "consumer"))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    names = [value_name(r) for r in refs]
    for _, values, mask in batches_of_values(model, calibration, names, 32):
        for ref, name in zip(refs, names, strict=True):
            value, axis = values[name], cg.layouts[ref].axis
            if axis in (-1, value.ndim - 1):  # features last ([N, S, D]): real tokens only
                value, axis = token_rows(value, mask), -1
            total, count = _channel_means(value, axis)
            sums[name] = sums.get(name, 0) + total
            counts[name] = counts.get(name, 0) + count
    return {name: sums[name] / max(counts[name], 1) for name in sums}
