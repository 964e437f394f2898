"""The pruned ONNX graph itself as a trainable PyTorch module: the student when the source model's
parameters cannot be tied to the graph's initializers by name.

Rule. The module runs the graph's nodes in order with torch ops (one function per ONNX op, below);
every float initializer with more than one element is an ``nn.Parameter``, except tables read only
by Gather (token embeddings: pruning never cuts them, and their dense gradient and Adam state, 30k x
384 on MiniLM, cost more than the rest of a step); everything else (shape constants, integer tables,
scalars) is a fixed tensor. Training changes only those values, so the
trained student is the pruned graph with its float initializers replaced (``trained_graph``): the
same nodes, names, dims and opset, no re-export and nothing to map back.

Why not the source model: a transformers export shares identical initializers (every zero bias is one
tensor, every unit LayerNorm weight another) and names the weights of Linear layers on 3-D inputs
``val_N`` with numbers that change from one export to the next, so name and value matching (what
onnxforge.converters.student does for plain modules) ties the wrong tensors together. The graph
needs no matching: it *is* the pruned network. An op this module does not implement is refused in
one line; parity with onnxruntime is measured by the caller, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from onnxforge.errors import UsageError

__all__ = ["GraphStudent", "unsupported_ops"]

Op = Callable[[onnx.NodeProto, list], object]


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ints(value: torch.Tensor | None) -> list[int]:
    return [] if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _reshape(node, x):
    data, shape = x[0], _ints(x[1])
    if not _attr(node, "allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _slice(node, x):
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 1:
            raise UsageError("distill: Slice with a negative step is not supported by the graph student")
        size = data.shape[axis]
        index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
    return data[tuple(index)]


def _squeeze(node, x):
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else _attr(node, "axes")
    if axes is None:
        return x[0].squeeze()
    return x[0].squeeze(tuple(a % x[0].dim() for a in axes))


def _unsqueeze(node, x):
    axes = _ints(x[1]) if len(x) > 1 else list(_attr(node, "axes"))
    out = x[0]
    rank = out.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        out = out.unsqueeze(axis)
    return out


def _shape(node, x):
    dims = list(x[0].shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _gather_nd(node, x):
    if _attr(node, "batch_dims", 0):
        raise UsageError("distill: GatherND with batch_dims is not supported by the graph student")
    data, indices = x
    return data[tuple(indices.unbind(-1))]


def _layer_norm(node, x):
    axis = _attr(node, "axis", -1) % x[0].dim()
    shape = tuple(x[0].shape[axis:])
    bias = x[2] if len(x) > 2 else None
    return torch.nn.functional.layer_norm(x[0], shape, x[1].expand(shape), None if bias is None else bias.expand(shape),
                                          _attr(node, "epsilon", 1e-5))


def _gemm(node, x):
    a = x[0].T if _attr(node, "transA", 0) else x[0]
    b = x[1].T if _attr(node, "transB", 0) else x[1]
    out = _attr(node, "alpha", 1.0) * (a @ b)
    return out + _attr(node, "beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else out


def _reduce(fn):
    def run(node, x):
        axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else _attr(node, "axes")
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            return fn(x[0], dim=tuple(range(x[0].dim())), keepdim=keep)
        return fn(x[0], dim=tuple(axes), keepdim=keep)
    return run


def _dtype(onnx_type: int) -> torch.dtype:
    return {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.INT64: torch.int64,
            onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
            onnx.TensorProto.DOUBLE: torch.float64, onnx.TensorProto.FLOAT16: torch.float16}[onnx_type]  # type: ignore[index]


def _gather(node, x):
    data, indices = x
    axis = _attr(node, "axis", 0) % data.dim()
    picked = torch.index_select(data, axis, indices.reshape(-1) % data.shape[axis])
    return picked.reshape(*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])


def _expand(node, x):
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1])))
    return x[0].expand(shape)


_OPS: dict[str, Op] = {
    "Add": lambda n, x: x[0] + x[1], "Sub": lambda n, x: x[0] - x[1], "Mul": lambda n, x: x[0] * x[1],
    "Div": lambda n, x: x[0] / x[1] if x[0].is_floating_point() else torch.div(x[0], x[1], rounding_mode="trunc"),
    "Pow": lambda n, x: x[0] ** x[1], "MatMul": lambda n, x: x[0] @ x[1], "Gemm": _gemm,
    "Sqrt": lambda n, x: torch.sqrt(x[0]), "Erf": lambda n, x: torch.erf(x[0]), "Tanh": lambda n, x: torch.tanh(x[0]),
    "Relu": lambda n, x: torch.relu(x[0]), "Sigmoid": lambda n, x: torch.sigmoid(x[0]),
    "Neg": lambda n, x: -x[0], "Exp": lambda n, x: torch.exp(x[0]), "Log": lambda n, x: torch.log(x[0]),
    "Abs": lambda n, x: torch.abs(x[0]), "Reciprocal": lambda n, x: 1.0 / x[0],
    "Gelu": lambda n, x: torch.nn.functional.gelu(x[0], approximate=_attr(n, "approximate", "none")),
    "Softmax": lambda n, x: torch.softmax(x[0], _attr(n, "axis", -1)),
    "LayerNormalization": _layer_norm, "Reshape": _reshape, "Slice": _slice, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Shape": _shape, "GatherND": _gather_nd, "Expand": _expand,
    "Transpose": lambda n, x: x[0].permute(_attr(n, "perm", list(range(x[0].dim()))[::-1])),
    "Concat": lambda n, x: torch.cat(x, _attr(n, "axis")),
    "Gather": _gather,
    "Cast": lambda n, x: x[0].to(_dtype(_attr(n, "to"))), "Identity": lambda n, x: x[0],
    "Where": lambda n, x: torch.where(x[0], x[1], x[2]), "And": lambda n, x: x[0] & x[1],
    "Or": lambda n, x: x[0] | x[1], "Not": lambda n, x: ~x[0], "Equal": lambda n, x: x[0] == x[1],
    "Greater": lambda n, x: x[0] > x[1], "GreaterOrEqual": lambda n, x: x[0] >= x[1],
    "Less": lambda n, x: x[0] < x[1], "LessOrEqual": lambda n, x: x[0] <= x[1], "IsNaN": lambda n, x: torch.isnan(x[0]),
    "Max": lambda n, x: _fold(torch.maximum, x), "Min": lambda n, x: _fold(torch.minimum, x),
    "Range": lambda n, x: torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype),
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ConstantOfShape": lambda n, x: torch.full(tuple(_ints(x[0])), _const(n).item(), dtype=_const(n).dtype),
    "Constant": lambda n, x: _const(n),
}


def _fold(fn, x: list) -> torch.Tensor:
    out = x[0]
    for other in x[1:]:
        out = fn(out, other)
    return out


def _const(node: onnx.NodeProto) -> torch.Tensor:
    value = _attr(node, "value")
    if value is None:
        return torch.zeros((), dtype=torch.float32)  # ConstantOfShape's default; Constant always has value
    return torch.from_numpy(np.array(numpy_helper.to_array(value)))


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """The graph's op types this module cannot run (sorted); empty when it can run all of them."""
    return sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in _OPS})


class GraphStudent(nn.Module):
    """``model``'s graph run in torch; its float initializers are the parameters (see the module doc).

    Called with the graph's inputs by name; returns its outputs as a tuple."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise UsageError(f"distill: the pruned graph uses ops the graph student cannot run: {', '.join(missing)}")
        if any(a.g.node or a.graphs for n in model.graph.node for a in n.attribute):
            raise UsageError("distill: the pruned graph has subgraphs (If/Loop), which the graph student cannot run")
        self.model = model
        self.names: dict[str, str] = {}  # initializer -> parameter key (parameter names cannot hold dots)
        self.fixed: dict[str, torch.Tensor] = {}
        self.weights = nn.ParameterDict()
        readers: dict[str, set[str]] = {}
        for node in model.graph.node:
            for position, name in enumerate(node.input):
                readers.setdefault(name, set()).add(node.op_type if position == 0 else f"{node.op_type}:{position}")
        for i, init in enumerate(model.graph.initializer):
            array = np.array(numpy_helper.to_array(init))
            tensor = torch.from_numpy(array)
            table = readers.get(init.name) == {"Gather"}
            if tensor.is_floating_point() and tensor.numel() > 1 and not table:
                key = f"w{i}"
                self.names[init.name] = key
                self.weights[key] = nn.Parameter(tensor)
            else:
                self.fixed[init.name] = tensor
        self.inputs = [i.name for i in model.graph.input if i.name not in self.names and i.name not in self.fixed]
        self.outputs = [o.name for o in model.graph.output]

    def forward(self, **feeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: dict[str, torch.Tensor] = dict(self.fixed)
        values.update({name: self.weights[key] for name, key in self.names.items()})
        values.update({name: feeds[name] for name in self.inputs if name in feeds})
        for node in self.model.graph.node:
            args = [values[name] if name else None for name in node.input]
            out = _OPS[node.op_type](node, args)
            results = out if isinstance(out, tuple) else (out,)
            values.update(zip(node.output, results, strict=False))
        return tuple(values[name] for name in self.outputs)

    def trained_graph(self) -> onnx.ModelProto:
        """A copy of the graph with the current parameter values as its float initializers."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.model)
        for init in proto.graph.initializer:
            key = self.names.get(init.name)
            if key is not None:
                array = self.weights[key].detach().cpu().numpy().astype(numpy_helper.to_array(init).dtype)
                init.CopyFrom(numpy_helper.from_array(array, init.name))
        return proto
