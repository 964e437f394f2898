"""What a model costs: its parameters and the multiply-accumulates of its weight layers.

Parameters are the elements of stored weights. ``inspect`` counts every stored weight:
initializers, Constant nodes' values and subgraphs' weights (exporters such as spox keep weights
in Constants inside If branches). The prune stages count the top graph's initializers only: the
weights they rewrite. MACs count Conv/ConvTranspose/Gemm/MatMul with a constant weight, per sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

__all__ = ["count_parameters", "count_params_and_macs", "with_input_shapes"]


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


def count_params_and_macs(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[int, int]:
    """(parameters in initializers, multiply-accumulates per sample of Conv/ConvTranspose/Gemm/MatMul layers).

    ``input_shapes`` (batch 1) replace the declared input dims for shape inference: the MACs of a
    model with a dynamic H/W are then those of the data's size.
    """
    if input_shapes:
        model = with_input_shapes(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = onnx.shape_inference.infer_shapes(model)
    inits = {t.name: tuple(t.dims) for t in inferred.graph.initializer}
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    params = count_parameters(inferred.graph, initializers_only=True)
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
