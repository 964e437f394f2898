"""Channel dependency groups over an ONNX graph (the DepGraph idea, arXiv 2301.12900).

Rule: removing channel c of a tensor is only legal when every parameter slice and every other
tensor dimension that is coupled to it is removed as well. We walk the graph once in topological
order and keep, for each tensor that carries channels, a *layout*: the axis the channels live on,
an ``expand`` factor (a flattened NCHW tensor holds channel c at features [c*HW, (c+1)*HW)) and a
list of *segments* ``(group, length)`` (a Concat along the channel axis lays its inputs' groups side
by side; everything else has one segment). Ops couple groups:

- Conv (group=1) / ConvTranspose / Gemm / MatMul with constant weights *start* a new group at their
  output (weight out-axis, bias) and *consume* the input's groups (weight in-axis);
- depthwise Conv (group = C_in = C_out) passes its input's groups through (weight, bias and the
  ``group`` attribute follow);
- grouped Conv (group = G, at least 2 input and 2 output channels per group) starts a group at its
  output and consumes its input's group like a plain Conv, but both groups are split into G equal
  *blocks* that must each keep the same number of channels (so ``group`` stays G): output channel o
  of block g reads input channels [g*C_in/G, (g+1)*C_in/G) through weight[o, :], so the weight's
  input axis is cut block by block (``ParamSlice.groups``);
- BatchNormalization, unary elementwise ops and pooling pass groups through (their per-channel
  parameters follow);
- Add/Mul/… with several dynamic inputs *merge* the inputs' groups (both branches of a residual
  block shrink together); a per-channel constant operand follows the group, a scalar one (the
  1/sqrt(2), 1 and 0.5 of an Erf-GELU) broadcasts and couples nothing;
- Concat on the channel axis concatenates segments (offset bookkeeping), Reduce*/Flatten/Reshape/
  Squeeze/Unsqueeze/Transpose move the channel axis, and Flatten/Reshape of [N,C,H,W] to [N,C*H*W]
  multiplies ``expand`` (a literal in the Reshape's shape constant is rewritten).

Groups are merged with union-find. A group is *blocked* (left alone, with the reason listed) when
any of its tensors reaches a graph input or output, an op we do not understand, a grouped Conv it
cannot split evenly, or a shape we cannot follow. Blocking is conservative: an unknown op can never be broken by pruning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxforge.pipeline.prune.graph import layer_name

__all__ = ["ChannelGroup", "ChannelGroups", "ParamSlice", "find_channel_groups"]

_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Gelu",
    "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Softplus", "Softsign", "Mish",
    "Cast", "Floor", "Ceil", "Round", "Reciprocal", "Sin", "Cos", "ThresholdedRelu", "Clip", "Swish",
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd",
           "ReduceLogSumExp", "ReduceSumSquare"}


@dataclass(frozen=True)
class _Layout:
    axis: int
    expand: int
    segments: tuple[tuple[int, int], ...]  # (group id before union-find resolution, channels)

    @property
    def width(self) -> int:
        return sum(n for _, n in self.segments) * self.expand


@dataclass(frozen=True)
class ParamSlice:
    """Axis ``axis`` of ``node.inputs[index]`` (a constant) is indexed like the channels of ``ref``."""

    node: ir.Node
    index: int
    axis: int
    ref: ir.Value
    role: str  # "producer" (output channels), "consumer" (input channels) or "follower"
    groups: int = 1  # > 1: a grouped Conv's weight input axis, holding block g's channels for outputs of block g


@dataclass
class ChannelGroup:
    """Channels that must be removed together: their count, the layers involved, and why not, if blocked."""

    id: int
    root: int
    channels: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    blocks: int = 1  # the channels form this many equal blocks that keep equal counts (grouped Convs)

    @property
    def prunable(self) -> bool:
        return not self.blocked and bool(self.producers) and self.channels > 1

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "channels": self.channels,
            "producers": self.producers,
            "consumers": self.consumers,
            "prunable": self.prunable,
            "blocked": self.blocked,
            "blocks": self.blocks,
        }


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).ravel()]


def _shape(value: ir.Value | None) -> list[int | None] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


class ChannelGroups:
    """The result of :func:`find_channel_groups`: groups, parameter slices and index bookkeeping."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._parent: list[int] = []
        self._channels: list[int] = []
        self._blocked: dict[int, list[str]] = {}
        self._producers: dict[int, list[str]] = {}
        self._consumers: dict[int, list[str]] = {}
        self._blocks: dict[int, int] = {}
        self.layouts: dict[ir.Value, _Layout] = {}
        self.params: list[ParamSlice] = []
        self.group_attrs: list[tuple[ir.Node, ir.Value]] = []  # depthwise Conv 'group' follows the value
        self.shape_literals: list[tuple[ir.Node, int, ir.Value]] = []  # Reshape shape[pos] = width(value)
        self.skipped: dict[str, str] = {}  # layer name -> why it cannot be pruned

    # -- union-find ---------------------------------------------------------------------------
    def _new(self, channels: int, blocked: str | None = None) -> int:
        gid = len(self._parent)
        self._parent.append(gid)
        self._channels.append(channels)
        if blocked:
            self._blocked.setdefault(gid, []).append(blocked)
        return gid

    def find(self, gid: int) -> int:
        while self._parent[gid] != gid:
            self._parent[gid] = self._parent[self._parent[gid]]
            gid = self._parent[gid]
        return gid

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self._parent[rb] = ra
        self._blocked.setdefault(ra, []).extend(self._blocked.pop(rb, []))
        self._producers.setdefault(ra, []).extend(self._producers.pop(rb, []))
        self._consumers.setdefault(ra, []).extend(self._consumers.pop(rb, []))
        blocks = self._blocks.pop(rb, 1)
        if blocks > 1:
            self._split(ra, blocks, "a grouped Conv")

    def _split(self, gid: int, blocks: int, why: str) -> None:
        """Require ``gid``'s channels to shrink by the same count in each of ``blocks`` equal blocks."""
        root = self.find(gid)
        merged = int(np.lcm(self._blocks.get(root, 1), blocks))
        if self._channels[root] % merged:
            reasons = self._blocked.setdefault(root, [])
            reasons.append(f"{why} needs {merged} equal blocks of {self._channels[root]} channels")
        self._blocks[root] = merged

    def _block(self, layout: _Layout | None, reason: str) -> None:
        if layout is None:
            return
        for gid, _ in layout.segments:
            reasons = self._blocked.setdefault(self.find(gid), [])
            if reason not in reasons:
                reasons.append(reason)

    def _tie(self, a: _Layout, b: _Layout, reason: str) -> bool:
        if a.expand != b.expand or [n for _, n in a.segments] != [n for _, n in b.segments]:
            self._block(a, reason)
            self._block(b, reason)
            return False
        for (ga, _), (gb, _) in zip(a.segments, b.segments):
            self._union(ga, gb)
        return True

    # -- layouts ------------------------------------------------------------------------------
    def layout_of(self, value: ir.Value, axis: int, why: str) -> _Layout | None:
        """The value's layout with channels on ``axis``; a fresh blocked group when it has none."""
        layout = self.layouts.get(value)
        if layout is None:
            shape = _shape(value)
            channels = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
            source = "a graph input" if value.is_graph_input() else (
                f"{value.producer().op_type} {layer_name(value.producer())}" if value.producer() else "a constant")
            gid = self._new(channels or 0, f"channels come from {source}")
            layout = _Layout(axis % len(shape) if shape else axis, 1, ((gid, channels or 0),))
            self.layouts[value] = layout
            return layout
        rank = len(value.shape) if value.shape is not None else None
        if layout.axis != (axis if axis >= 0 or rank is None else axis + rank):
            self._block(layout, f"{why} reads another axis")
            return None
        return layout

    def _producer(self, node: ir.Node, out: ir.Value, axis: int, channels: int) -> _Layout:
        gid = self._new(channels)
        self._producers.setdefault(gid, []).append(layer_name(node))
        layout = _Layout(axis, 1, ((gid, channels),))
        self.layouts[out] = layout
        return layout

    def _consumer(self, node: ir.Node, layout: _Layout) -> None:
        for gid, _ in layout.segments:
            self._consumers.setdefault(self.find(gid), []).append(layer_name(node))

    def _block_inputs(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            if value is not None and value in self.layouts:
                self._block(self.layouts[value], reason)

    # -- results ------------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        roots: dict[int, ChannelGroup] = {}
        for gid in range(len(self._parent)):
            root = self.find(gid)
            if root not in roots:
                roots[root] = ChannelGroup(
                    id=len(roots),
                    root=root,
                    channels=self._channels[root],
                    producers=list(dict.fromkeys(self._producers.get(root, []))),
                    consumers=list(dict.fromkeys(self._consumers.get(root, []))),
                    blocked=list(dict.fromkeys(self._blocked.get(root, []))),
                    blocks=self._blocks.get(root, 1),
                )
        return [g for g in roots.values() if g.producers or g.consumers]

    def indices(self, value: ir.Value, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Positions along the value's channel axis that survive, given kept channels per root."""
        layout = self.layouts[value]
        parts, offset = [], 0
        for gid, n in layout.segments:
            kept = keep.get(self.find(gid))
            parts.append(offset + (np.arange(n) if kept is None else kept))
            offset += n
        channels = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if layout.expand == 1:
            return channels
        return (channels[:, None] * layout.expand + np.arange(layout.expand)[None, :]).ravel()

    def roots(self, value: ir.Value) -> list[int]:
        layout = self.layouts.get(value)
        return [self.find(g) for g, _ in layout.segments] if layout else []


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _visit_conv(cg: ChannelGroups, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    name = layer_name(node)
    if w is None or w.const_value is None or (b is not None and b.const_value is None):
        cg.skipped[name] = "weights are not constant"
        cg._block_inputs(node, f"{node.op_type} {name} has non-constant weights")
        return
    wshape = list(w.const_value.shape)
    groups = int(_attr(node, "group", 1))
    transpose = node.op_type == "ConvTranspose"
    in_axis, out_axis = (0, 1) if transpose else (1, 0)
    cin = wshape[in_axis] * (1 if transpose else groups)
    cout = wshape[out_axis] * (groups if transpose else 1)
    if groups == 1:
        layout = cg.layout_of(x, 1, f"{node.op_type} {name}")
        if layout is not None:
            cg.params.append(ParamSlice(node, 1, in_axis, x, "consumer"))
            cg._consumer(node, layout)
        cg._producer(node, y, 1, cout)
        cg.params.append(ParamSlice(node, 1, out_axis, y, "producer"))
        if b is not None:
            cg.params.append(ParamSlice(node, 2, 0, y, "follower"))
        return
    if not transpose and groups == cin == cout and wshape[1] == 1:
        # depthwise: channel c in -> channel c out; weight, bias and the group count follow
        layout = cg.layout_of(x, 1, f"depthwise Conv {name}")
        if layout is None:
            return
        cg.layouts[y] = layout
        cg.params.append(ParamSlice(node, 1, 0, y, "follower"))
        if b is not None:
            cg.params.append(ParamSlice(node, 2, 0, y, "follower"))
        cg.group_attrs.append((node, y))
        return
    if not transpose and wshape[1] >= 2 and cout // groups >= 2 and cout % groups == 0:
        layout = cg.layout_of(x, 1, f"grouped Conv {name}")
        if layout is not None:
            if len(layout.segments) != 1 or layout.expand != 1:
                cg._block(layout, f"grouped Conv {name} reads a concatenated or flattened input")
            else:
                cg._split(layout.segments[0][0], groups, f"grouped Conv {name}")
                cg.params.append(ParamSlice(node, 1, 1, x, "consumer", groups))
                cg._consumer(node, layout)
        out = cg._producer(node, y, 1, cout)
        cg._split(out.segments[0][0], groups, f"grouped Conv {name}")
        cg.params.append(ParamSlice(node, 1, 0, y, "producer"))
        if b is not None:
            cg.params.append(ParamSlice(node, 2, 0, y, "follower"))
        return
    reason = f"grouped {node.op_type} (group={groups}) with fewer than 2 channels per group"
    cg.skipped[name] = reason
    cg._block_inputs(node, f"{name} is a {reason}")
    cg.layouts[y] = _Layout(1, 1, ((cg._new(cout, f"{name} is a {reason}"), cout),))


def _visit_gemm(cg: ChannelGroups, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    name = layer_name(node)
    if w is None or w.const_value is None or (c is not None and c.const_value is None) or _attr(node, "transA", 0):
        cg.skipped[name] = "non-constant weights or transA"
        cg._block_inputs(node, f"Gemm {name} has non-constant weights or transA")
        return
    trans_b = int(_attr(node, "transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    n = int(w.const_value.shape[n_axis])
    layout = cg.layout_of(x, 1, f"Gemm {name}")
    if layout is not None:
        cg.params.append(ParamSlice(node, 1, k_axis, x, "consumer"))
        cg._consumer(node, layout)
    out = cg._producer(node, y, 1, n)
    cg.params.append(ParamSlice(node, 1, n_axis, y, "producer"))
    if c is not None:
        cshape = list(c.const_value.shape)
        if cshape and cshape[-1] == n and int(np.prod(cshape)) == n:
            cg.params.append(ParamSlice(node, 2, len(cshape) - 1, y, "follower"))
        elif int(np.prod(cshape)) != 1:
            cg._block(out, f"Gemm {name} has a bias of shape {cshape}")


def _visit_matmul(cg: ChannelGroups, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    name = layer_name(node)
    xs, ys = _shape(x), _shape(y)
    if w is None or w.const_value is None or len(w.const_value.shape) != 2 or xs is None or ys is None:
        cg.skipped[name] = "MatMul of two activations (or unknown shapes)"
        cg._block_inputs(node, f"MatMul {name} has no constant 2-D weight")
        return
    layout = cg.layout_of(x, len(xs) - 1, f"MatMul {name}")
    if layout is not None:
        cg.params.append(ParamSlice(node, 1, 0, x, "consumer"))
        cg._consumer(node, layout)
    cg._producer(node, y, len(ys) - 1, int(w.const_value.shape[1]))
    cg.params.append(ParamSlice(node, 1, 1, y, "producer"))


def _visit_elementwise(cg: ChannelGroups, node: ir.Node) -> None:
    y = node.outputs[0]
    ys = _shape(y)
    name = layer_name(node)
    inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    dynamic = [(i, v) for i, v in inputs if v.const_value is None]
    with_layout = [(i, v) for i, v in dynamic if v in cg.layouts]
    if not with_layout:
        return  # no channels flow through here (e.g. shape arithmetic)
    if ys is None or any(_shape(v) is None for _, v in dynamic):
        cg._block_inputs(node, f"{node.op_type} {name} has unknown shapes")
        return
    rank = len(ys)
    first = cg.layouts[with_layout[0][1]]
    out_axis = first.axis + rank - len(_shape(with_layout[0][1]))
    out_layout: _Layout | None = None
    for i, v in inputs:
        vs = _shape(v) if v.const_value is None else list(v.const_value.shape)
        axis = out_axis - (rank - len(vs))
        if axis < 0 or vs[axis] == 1:
            continue  # broadcast over the channels: no coupling
        if v.const_value is not None:
            if vs[axis] != first.width:
                cg._block_inputs(node, f"{node.op_type} {name} has a constant of shape {vs}")
                return
            cg.params.append(ParamSlice(node, i, axis, y, "follower"))
            continue
        layout = cg.layout_of(v, axis, f"{node.op_type} {name}")
        if layout is None:
            cg._block_inputs(node, f"{node.op_type} {name} mixes channel axes")
            return
        if out_layout is None:
            out_layout = layout
        elif not cg._tie(out_layout, layout, f"{node.op_type} {name} joins tensors of different layouts"):
            return
    if out_layout is not None:
        cg.layouts[y] = _Layout(out_axis, out_layout.expand, out_layout.segments)


def _passthrough(cg: ChannelGroups, node: ir.Node, x: ir.Value, new_axis: int | None = None) -> None:
    layout = cg.layouts.get(x)
    if layout is None:
        return
    cg.layouts[node.outputs[0]] = _Layout(layout.axis if new_axis is None else new_axis, layout.expand, layout.segments)


def _visit_node(cg: ChannelGroups, node: ir.Node) -> None:
    op = node.op_type
    name = layer_name(node)
    inputs = [v for v in node.inputs if v is not None]
    channel_inputs = [v for v in inputs if v in cg.layouts]
    if node.domain not in ("", "ai.onnx"):
        cg._block_inputs(node, f"custom op {node.domain}::{op} {name}")
        return
    if op in ("Conv", "ConvTranspose"):
        _visit_conv(cg, node)
        return
    if op == "Gemm":
        _visit_gemm(cg, node)
        return
    if op == "MatMul" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        _visit_matmul(cg, node)
        return
    if not channel_inputs:
        return  # nothing with channels flows in (shape subgraphs, constants)
    x = node.inputs[0]
    layout = cg.layouts.get(x)
    used_extra_outputs = any(o.uses() for o in node.outputs[1:])
    if op in _UNARY and not used_extra_outputs:
        if any(v.const_value is None and v in cg.layouts for v in inputs[1:]):
            cg._block_inputs(node, f"{op} {name} takes channels in a side input")
            return
        _passthrough(cg, node, x)
        return
    if op in _ELEMENTWISE:
        _visit_elementwise(cg, node)
        return
    if layout is None:
        cg._block_inputs(node, f"{op} {name} reads channels in an input other than the first")
        return
    xs = _shape(x)
    if op in ("BatchNormalization", "InstanceNormalization") and layout.axis == 1 and not used_extra_outputs:
        params = node.inputs[1:]
        if all(p is not None and p.const_value is not None for p in params):
            y = node.outputs[0]
            _passthrough(cg, node, x)
            cg.params.extend(ParamSlice(node, i + 1, 0, y, "follower") for i in range(len(params)))
            return
    if op in _POOL and layout.axis == 1 and not used_extra_outputs:
        _passthrough(cg, node, x)
        return
    if op in _REDUCE and xs is not None:
        axes = _ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if axes is None and "axes" in node.attributes:
            axes = list(_attr(node, "axes", []))
        if axes is not None:
            axes = [a % len(xs) for a in axes]
            if axes and layout.axis not in axes:
                keep = int(_attr(node, "keepdims", 1))
                _passthrough(cg, node, x, layout.axis if keep else layout.axis - sum(a < layout.axis for a in axes))
                return
    if op in ("Softmax", "LogSoftmax") and xs is not None:
        if int(_attr(node, "axis", -1)) % len(xs) != layout.axis:
            _passthrough(cg, node, x)
            return
    if op == "Transpose":
        perm = list(_attr(node, "perm", [])) or (list(range(len(xs)))[::-1] if xs else [])
        if perm:
            _passthrough(cg, node, x, perm.index(layout.axis))
            return
    if op in ("Flatten", "Reshape") and xs is not None:
        if _visit_flatten(cg, node, layout, xs):
            return
    if op == "Squeeze" and xs is not None:
        axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else list(_attr(node, "axes", []) or [])
        if axes:
            axes = [a % len(xs) for a in axes]
            if layout.axis not in axes:
                _passthrough(cg, node, x, layout.axis - sum(a < layout.axis for a in axes))
                return
    if op == "Unsqueeze" and xs is not None:
        axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else list(_attr(node, "axes", []) or [])
        if axes:
            out_rank = len(xs) + len(axes)
            position = layout.axis
            for a in sorted(a % out_rank for a in axes):
                if a <= position:
                    position += 1
            _passthrough(cg, node, x, position)
            return
    if op == "Pad" and xs is not None:
        pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else list(_attr(node, "pads", []) or [])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(xs)))
        if pads is not None and axes is not None:
            padded = {a % len(xs) for j, a in enumerate(axes) if pads[j] or pads[j + len(axes)]}
            if layout.axis not in padded:
                _passthrough(cg, node, x)
                return
    if op == "Concat" and xs is not None:
        if _visit_concat(cg, node, int(_attr(node, "axis", 0)) % len(xs)):
            return
    reason = f"{op} {name} (not understood for channel pruning)"
    cg._block_inputs(node, reason)


def _visit_flatten(cg: ChannelGroups, node: ir.Node, layout: _Layout, xs: list[int | None]) -> bool:
    """[N, C, d...] -> [N, C*prod(d)]: channel c becomes features [c*prod(d), (c+1)*prod(d))."""
    y = node.outputs[0]
    ys = _shape(y)
    inner = xs[layout.axis + 1 :]
    if layout.axis != 1 or any(d is None for d in inner) or ys is None or len(ys) != 2:
        return False
    expand = layout.expand * int(np.prod(inner, dtype=np.int64))
    if node.op_type == "Flatten":
        if int(_attr(node, "axis", 1)) % len(xs) != 1:
            return False
        cg.layouts[y] = _Layout(1, expand, layout.segments)
        return True
    target = _ints(node.inputs[1])
    width = layout.width * int(np.prod(inner, dtype=np.int64))
    if target is None or len(target) != 2 or target[1] not in (-1, width) or target[0] == target[1] == -1:
        return False
    if 0 in target and int(_attr(node, "allowzero", 0)):
        return False  # a literal zero dimension, not "copy the input's"
    cg.layouts[y] = _Layout(1, expand, layout.segments)
    if target[1] == width:
        cg.shape_literals.append((node, 1, y))
    return True


def _visit_concat(cg: ChannelGroups, node: ir.Node, axis: int) -> bool:
    parts = []
    for v in node.inputs:
        if v is None or v.const_value is not None:
            return False
        layout = cg.layout_of(v, axis, f"Concat {layer_name(node)}")
        if layout is None:
            return False
        parts.append(layout)
    if len({p.expand for p in parts}) != 1:
        return False
    segments = tuple(s for p in parts for s in p.segments)
    cg.layouts[node.outputs[0]] = _Layout(axis, parts[0].expand, segments)
    return True


def find_channel_groups(graph: ir.Graph, exclude: Iterable[str] = ()) -> ChannelGroups:
    """Walk ``graph`` (topologically sorted, shapes inferred) and group the coupled channels.

    Nodes named in ``exclude`` keep all their output channels (their groups are blocked).
    """
    cg = ChannelGroups(graph)
    excluded = set(exclude)
    for node in graph:
        _visit_node(cg, node)
        if layer_name(node) in excluded or node.name in excluded:
            for out in node.outputs:
                if out in cg.layouts:
                    cg._block(cg.layouts[out], f"{layer_name(node)} is excluded")
            cg.skipped[layer_name(node)] = "excluded"
    for value in graph.outputs:
        if value in cg.layouts:
            cg._block(cg.layouts[value], f"reaches graph output {value.name}")
    return cg
