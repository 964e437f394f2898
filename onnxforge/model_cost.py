"""What a model costs: its parameters and the multiply-accumulates of its weight layers.

Parameters are the elements of stored weights. ``inspect`` counts every stored weight:
initializers, Constant nodes' values and subgraphs' weights (exporters such as spox keep weights
in Constants inside If branches). The prune stages count the top graph's initializers only: the
weights they rewrite. MACs count Conv/ConvTranspose/Gemm/MatMul with a constant weight, per sample,
and their quantized forms: a weight read through DequantizeLinear (QDQ), QLinearConv, QGemm,
QLinearMatMul, ConvInteger, MatMulInteger and MatMulNBits (``ComputeCost`` keeps the float and the
integer MACs apart, and counts the kernels onnxruntime would launch, for the search's cost estimate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["ComputeCost", "compute_cost", "count_parameters", "count_params_and_macs", "with_input_shapes"]


def count_parameters(graph: onnx.GraphProto, *, initializers_only: bool = False) -> int:
    """Elements of the weights stored in ``graph``: its initializers and, unless ``initializers_only``,
    its Constant nodes' values and its subgraphs' weights."""
    total = sum(int(np.prod(init.dims, dtype=np.int64)) for init in graph.initializer)
    if initializers_only:
        return total
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                total += int(np.prod(attr.t.dims, dtype=np.int64))
            elif attr.type == onnx.AttributeProto.GRAPH:
                total += count_parameters(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_parameters(g) for g in attr.graphs)
    return total


def with_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs named in ``shapes`` declare those concrete dims (same rank only)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in copy.graph.input:
        shape = shapes.get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if shape is None or len(shape) != len(dims):
            continue
        for d, size in zip(dims, shape, strict=True):
            d.Clear()
            d.dim_value = int(size)
    return copy


# where the weight of each quantized weight layer is (its input index), and the float layer it stands for
_INTEGER_LAYERS = {"QLinearConv": (3, "Conv"), "QGemm": (3, "Gemm"), "QLinearMatMul": (3, "MatMul"),
                   "ConvInteger": (1, "Conv"), "MatMulInteger": (1, "MatMul")}
# nodes onnxruntime folds into a neighbour at batch 1 on the CPU: Q/DQ pairs between ops it has integer
# kernels for, an activation into the Conv (or Conv + Add) before it
_FOLDED = {"QuantizeLinear", "DequantizeLinear", "Identity"}
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid"}
_INTEGER_KERNELS = {"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "MaxPool",
                    *_ACTIVATIONS, *_INTEGER_LAYERS}

@dataclass(frozen=True)
class ComputeCost:
    """A model's multiply-accumulates per sample, in float and in integer (int8/int4) weight layers, and the
    kernels a run launches (nodes, less those onnxruntime folds away: Q/DQ around integer kernels, an
    activation after a Conv or after the Add that follows one)."""

    float_macs: int
    integer_macs: int
    kernels: int

    @property
    def macs(self) -> int:
        return self.float_macs + self.integer_macs


def _kernels(graph: onnx.GraphProto) -> int:
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}

    def folded(node: onnx.NodeProto) -> bool:
        if node.op_type == "QuantizeLinear":  # folded into the integer kernel that computes its input
            before = producer.get(node.input[0])
            return node.input[0] in weights or (before is not None and before.op_type in _INTEGER_KERNELS)
        if node.op_type == "DequantizeLinear":  # folded into the integer kernels that read it
            after = consumers.get(node.output[0], [])
            return node.input[0] in weights or (bool(after) and node.output[0] not in outputs
                                                and all(n.op_type in _INTEGER_KERNELS for n in after))
        if node.op_type in _FOLDED:
            return True
        if node.op_type not in _ACTIVATIONS or not node.input:
            return False
        before = producer.get(node.input[0])
        if before is not None and before.op_type == "Add":  # Conv + Add + Relu: the residual sum's activation
            before = next((producer[i] for i in before.input if i in producer
                           and producer[i].op_type in ("Conv", "QLinearConv")), None)
        return before is not None and before.op_type in ("Conv", "QLinearConv")

    return sum(not folded(node) for node in graph.node)


def _conv_spatial(node: onnx.NodeProto, spatial: list, kernel: tuple[int, ...]) -> list[int | None]:
    """A convolution's output spatial dims from its input's (what shape inference leaves unknown behind a
    com.microsoft node such as QLinearAdd)."""
    attrs = {a.name: a for a in node.attribute}
    rank = len(spatial)
    strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * rank
    dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * rank
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * rank)
    auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
    out: list[int | None] = []
    for i, size in enumerate(spatial):
        if size is None:
            out.append(None)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[i]))
        else:
            span = dilations[i] * (kernel[i] - 1) + 1
            out.append((size + pads[i] + pads[i + rank] - span) // strides[i] + 1)
    return out


def _fill_shapes(graph: onnx.GraphProto, shapes: dict[str, list], inits: Mapping[str, tuple[int, ...]]) -> None:
    """Shapes shape inference could not give (outputs of com.microsoft nodes and what follows them): a
    quantized elementwise node keeps its first input's shape, a convolution computes its own."""
    for node in graph.node:
        known = shapes.get(node.output[0]) if node.output else []
        if not node.output or (known and None not in known[2:]):
            continue
        index, kind = _INTEGER_LAYERS.get(node.op_type, (1, node.op_type))
        source = shapes.get(node.input[0]) if node.input else None
        if source is None:
            continue
        if kind == "Conv" and len(node.input) > index and node.input[index] in inits:
            weight = inits[node.input[index]]
            shapes[node.output[0]] = [source[0], weight[0], *_conv_spatial(node, source[2:], weight[2:])]
        elif node.op_type.startswith("QLinear") or node.op_type in _FOLDED or node.op_type in _ACTIVATIONS:
            shapes[node.output[0]] = list(source)


def compute_cost(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> ComputeCost:
    """The MACs per sample of ``model``'s weight layers, float and integer apart, and its kernel count."""
    if input_shapes:
        model = with_input_shapes(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = onnx.shape_inference.infer_shapes(model)
    inits = {t.name: tuple(t.dims) for t in inferred.graph.initializer}
    dequantized = {n.output[0]: inits[n.input[0]] for n in inferred.graph.node
                   if n.op_type == "DequantizeLinear" and n.input and n.input[0] in inits}
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    _fill_shapes(inferred.graph, shapes, inits)
    float_macs = integer_macs = 0
    for node in inferred.graph.node:
        if node.op_type == "MatMulNBits":  # int4 weights, K x N from its attributes
            attrs = {a.name: a.i for a in node.attribute}
            middle = shapes.get(node.output[0], [])[1:-1]
            integer_macs += attrs.get("K", 0) * attrs.get("N", 0) * int(np.prod([d or 1 for d in middle]))
            continue
        index, kind = _INTEGER_LAYERS.get(node.op_type, (1, node.op_type))
        if len(node.input) <= index:
            continue
        weight = node.input[index]
        if weight in inits:
            dims, integer = inits[weight], node.op_type in _INTEGER_LAYERS
        elif weight in dequantized:  # QDQ: onnxruntime runs the pair as an integer kernel
            dims, integer = dequantized[weight], True
        else:
            continue
        size = int(np.prod(dims, dtype=np.int64))
        if kind == "Conv":
            spatial = shapes.get(node.output[0], [])[2:]
            macs = size * int(np.prod([d or 1 for d in spatial], dtype=np.int64))
        elif kind == "ConvTranspose":
            spatial = shapes.get(node.input[0], [])[2:]
            macs = size * int(np.prod([d or 1 for d in spatial], dtype=np.int64))
        elif kind == "Gemm":
            macs = size
        elif kind == "MatMul":
            middle = shapes.get(node.output[0], [])[1:-1]
            macs = size * int(np.prod([d or 1 for d in middle], dtype=np.int64))
        else:
            continue
        if integer:
            integer_macs += macs
        else:
            float_macs += macs
    return ComputeCost(float_macs, integer_macs, _kernels(inferred.graph))


def count_params_and_macs(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[int, int]:
    """(parameters in initializers, multiply-accumulates per sample of Conv/ConvTranspose/Gemm/MatMul layers,
    float or quantized: ``compute_cost``).

    ``input_shapes`` (batch 1) replace the declared input dims for shape inference: the MACs of a
    model with a dynamic H/W are then those of the data's size.
    """
    return count_parameters(model.graph, initializers_only=True), compute_cost(model, input_shapes).macs
