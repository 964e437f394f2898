"""How each op couples channel groups: one walk over the graph in topological order.

Rule (see onnxforge.pipeline.prune.channel_groups for layouts and groups):

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
  multiplies ``expand`` (a literal in the Reshape's shape constant is rewritten);
- anything else blocks the groups it reads.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.pipeline.prune.channel_groups import ChannelGroup, ChannelGroups, Layout, ParamSlice, value_shape
from onnxforge.pipeline.prune.graph import const_shape, layer_name, required_input

__all__ = ["find_channel_groups", "prunable_groups"]


_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Gelu",
    "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Softplus", "Softsign", "Mish",
    "Cast", "Floor", "Ceil", "Round", "Reciprocal", "Sin", "Cos", "ThresholdedRelu", "Clip", "Swish",
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd",
           "ReduceLogSumExp", "ReduceSumSquare"}


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).ravel()]


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _visit_conv(cg: ChannelGroups, node: ir.Node) -> None:
    x, w = required_input(node, 0), node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    name = layer_name(node)
    if w is None or w.const_value is None or (b is not None and b.const_value is None):
        cg.skipped[name] = "weights are not constant"
        cg.block_inputs(node, f"{node.op_type} {name} has non-constant weights")
        return
    wshape = list(const_shape(node, 1))
    groups = int(_attr(node, "group", 1))
    transpose = node.op_type == "ConvTranspose"
    in_axis, out_axis = (0, 1) if transpose else (1, 0)
    cin = wshape[in_axis] * (1 if transpose else groups)
    cout = wshape[out_axis] * (groups if transpose else 1)
    if groups == 1:
        layout = cg.layout_of(x, 1, f"{node.op_type} {name}", cin)
        if layout is not None:
            cg.params.append(ParamSlice(node, 1, in_axis, x, "consumer"))
            cg.add_consumer(node, layout)
        cg.add_producer(node, y, 1, cout)
        cg.params.append(ParamSlice(node, 1, out_axis, y, "producer"))
        if b is not None:
            cg.params.append(ParamSlice(node, 2, 0, y, "follower"))
        return
    if not transpose and groups == cin == cout and wshape[1] == 1:
        # depthwise: channel c in -> channel c out; weight, bias and the group count follow
        layout = cg.layout_of(x, 1, f"depthwise Conv {name}", cin)
        if layout is None:
            return
        cg.layouts[y] = layout
        cg.params.append(ParamSlice(node, 1, 0, y, "follower"))
        if b is not None:
            cg.params.append(ParamSlice(node, 2, 0, y, "follower"))
        cg.group_attrs.append((node, y))
        return
    if not transpose and wshape[1] >= 2 and cout // groups >= 2 and cout % groups == 0:
        layout = cg.layout_of(x, 1, f"grouped Conv {name}", cin)
        if layout is not None:
            if len(layout.segments) != 1 or layout.expand != 1:
                cg.block(layout, f"grouped Conv {name} reads a concatenated or flattened input")
            else:
                cg.split_blocks(layout.segments[0][0], groups, f"grouped Conv {name}")
                cg.params.append(ParamSlice(node, 1, 1, x, "consumer", groups))
                cg.add_consumer(node, layout)
        out = cg.add_producer(node, y, 1, cout)
        cg.split_blocks(out.segments[0][0], groups, f"grouped Conv {name}")
        cg.params.append(ParamSlice(node, 1, 0, y, "producer"))
        if b is not None:
            cg.params.append(ParamSlice(node, 2, 0, y, "follower"))
        return
    reason = f"grouped {node.op_type} (group={groups}) with fewer than 2 channels per group"
    cg.skipped[name] = reason
    cg.block_inputs(node, f"{name} is a {reason}")
    cg.layouts[y] = Layout(1, 1, ((cg.new_group(cout, f"{name} is a {reason}"), cout),))


def _visit_gemm(cg: ChannelGroups, node: ir.Node) -> None:
    x, w = required_input(node, 0), node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    name = layer_name(node)
    if w is None or w.const_value is None or (c is not None and c.const_value is None) or _attr(node, "transA", 0):
        cg.skipped[name] = "non-constant weights or transA"
        cg.block_inputs(node, f"Gemm {name} has non-constant weights or transA")
        return
    trans_b = int(_attr(node, "transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    wshape = const_shape(node, 1)
    n = wshape[n_axis]
    layout = cg.layout_of(x, 1, f"Gemm {name}", wshape[k_axis])
    if layout is not None:
        cg.params.append(ParamSlice(node, 1, k_axis, x, "consumer"))
        cg.add_consumer(node, layout)
    out = cg.add_producer(node, y, 1, n)
    cg.params.append(ParamSlice(node, 1, n_axis, y, "producer"))
    if c is not None:
        cshape = list(const_shape(node, 2))
        if cshape and cshape[-1] == n and int(np.prod(cshape)) == n:
            cg.params.append(ParamSlice(node, 2, len(cshape) - 1, y, "follower"))
        elif int(np.prod(cshape)) != 1:
            cg.block(out, f"Gemm {name} has a bias of shape {cshape}")


def _visit_matmul(cg: ChannelGroups, node: ir.Node) -> None:
    x, w = required_input(node, 0), node.inputs[1]
    y = node.outputs[0]
    name = layer_name(node)
    xs, ys = value_shape(x), value_shape(y)
    if w is None or w.const_value is None or len(w.const_value.shape) != 2 or xs is None or ys is None:
        cg.skipped[name] = "MatMul of two activations (or unknown shapes)"
        cg.block_inputs(node, f"MatMul {name} has no constant 2-D weight")
        return
    k, n = const_shape(node, 1)
    layout = cg.layout_of(x, len(xs) - 1, f"MatMul {name}", k)
    if layout is not None:
        cg.params.append(ParamSlice(node, 1, 0, x, "consumer"))
        cg.add_consumer(node, layout)
    cg.add_producer(node, y, len(ys) - 1, n)
    cg.params.append(ParamSlice(node, 1, 1, y, "producer"))


def _visit_elementwise(cg: ChannelGroups, node: ir.Node) -> None:
    y = node.outputs[0]
    ys = value_shape(y)
    name = layer_name(node)
    inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    dynamic = [(i, v) for i, v in inputs if v.const_value is None]
    with_layout = [(i, v) for i, v in dynamic if v in cg.layouts]
    if not with_layout:
        return  # no channels flow through here (e.g. shape arithmetic)
    first_shape = value_shape(with_layout[0][1])  # with_layout is part of dynamic
    if ys is None or first_shape is None or any(value_shape(v) is None for _, v in dynamic):
        cg.block_inputs(node, f"{node.op_type} {name} has unknown shapes")
        return
    rank = len(ys)
    first = cg.layouts[with_layout[0][1]]
    out_axis = first.axis + rank - len(first_shape)
    out_layout: Layout | None = None
    for i, v in inputs:
        vs = value_shape(v) if v.const_value is None else list(v.const_value.shape.numpy())
        if vs is None:  # never: the dynamic inputs' shapes were checked above
            continue
        axis = out_axis - (rank - len(vs))
        if axis < 0 or vs[axis] == 1:
            continue  # broadcast over the channels: no coupling
        if v.const_value is not None:
            if vs[axis] != first.width:
                cg.block_inputs(node, f"{node.op_type} {name} has a constant of shape {vs}")
                return
            cg.params.append(ParamSlice(node, i, axis, y, "follower"))
            continue
        layout = cg.layout_of(v, axis, f"{node.op_type} {name}")
        if layout is None:
            cg.block_inputs(node, f"{node.op_type} {name} mixes channel axes")
            return
        if out_layout is None:
            out_layout = layout
        elif not cg.tie(out_layout, layout, f"{node.op_type} {name} joins tensors of different layouts"):
            return
    if out_layout is not None:
        cg.layouts[y] = Layout(out_axis, out_layout.expand, out_layout.segments)


def _passthrough(cg: ChannelGroups, node: ir.Node, x: ir.Value | None, new_axis: int | None = None) -> None:
    layout = cg.layouts.get(x) if x is not None else None
    if layout is None:
        return
    cg.layouts[node.outputs[0]] = Layout(layout.axis if new_axis is None else new_axis, layout.expand, layout.segments)


def _visit_node(cg: ChannelGroups, node: ir.Node) -> None:
    op = node.op_type
    name = layer_name(node)
    inputs = [v for v in node.inputs if v is not None]
    channel_inputs = [v for v in inputs if v in cg.layouts]
    if node.domain not in ("", "ai.onnx"):
        cg.block_inputs(node, f"custom op {node.domain}::{op} {name}")
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
    layout = cg.layouts.get(x) if x is not None else None
    used_extra_outputs = any(o.uses() for o in node.outputs[1:])
    if op in _UNARY and not used_extra_outputs:
        if any(v.const_value is None and v in cg.layouts for v in inputs[1:]):
            cg.block_inputs(node, f"{op} {name} takes channels in a side input")
            return
        _passthrough(cg, node, x)
        return
    if op in _ELEMENTWISE:
        _visit_elementwise(cg, node)
        return
    if layout is None:
        cg.block_inputs(node, f"{op} {name} reads channels in an input other than the first")
        return
    xs = value_shape(x)
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
    cg.block_inputs(node, reason)


def _visit_flatten(cg: ChannelGroups, node: ir.Node, layout: Layout, xs: list[int | None]) -> bool:
    """[N, C, d...] -> [N, C*prod(d)]: channel c becomes features [c*prod(d), (c+1)*prod(d))."""
    y = node.outputs[0]
    ys = value_shape(y)
    inner = [d for d in xs[layout.axis + 1 :] if d is not None]
    if layout.axis != 1 or len(inner) != len(xs[layout.axis + 1 :]) or ys is None or len(ys) != 2:
        return False
    expand = layout.expand * int(np.prod(inner, dtype=np.int64))
    if node.op_type == "Flatten":
        if int(_attr(node, "axis", 1)) % len(xs) != 1:
            return False
        cg.layouts[y] = Layout(1, expand, layout.segments)
        return True
    target = _ints(node.inputs[1])
    width = layout.width * int(np.prod(inner, dtype=np.int64))
    if target is None or len(target) != 2 or target[1] not in (-1, width) or target[0] == target[1] == -1:
        return False
    if 0 in target and int(_attr(node, "allowzero", 0)):
        return False  # a literal zero dimension, not "copy the input's"
    cg.layouts[y] = Layout(1, expand, layout.segments)
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
    cg.layouts[node.outputs[0]] = Layout(axis, parts[0].expand, segments)
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
                    cg.block(cg.layouts[out], f"{layer_name(node)} is excluded")
            cg.skipped[layer_name(node)] = "excluded"
    for value in graph.outputs:
        if value in cg.layouts:
            cg.block(cg.layouts[value], f"reaches graph output {value.name}")
    return cg


def prunable_groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    """The channel groups of ``model`` that may lose channels (not blocked, with a producer, more than one
    channel): what channel pruning would act on; empty when it has nothing to remove."""
    from onnxforge.pipeline.prune.graph import prepared

    try:
        graph = prepared(model).graph
    except Exception:  # a graph shape inference cannot walk: nothing pruning could act on either
        return []
    return [g for g in find_channel_groups(graph).groups() if g.prunable]
