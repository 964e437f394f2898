"""Reading and editing graphs, shared by the structural prune stages (channels, repair, low rank).

Rule: a rewrite never edits a weight in place. It registers a new initializer under a fresh name
and points the node at it; afterwards the initializers nothing uses any more are dropped and the
inferred shapes of inner values are cleared (shape inference recomputes them). The rewritten model
must pass strict shape inference, ``onnx.checker`` and an onnxruntime session, or the stage fails
with InvalidModelError.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from onnxforge.errors import InvalidModelError
from onnxforge.targets.cpu import CpuTarget

__all__ = [
    "checked_model",
    "clear_inner_shapes",
    "const_array",
    "const_input",
    "const_shape",
    "drop_unused_initializers",
    "input_name",
    "layer_name",
    "lift_constants",
    "new_initializer",
    "prepared",
    "required_input",
    "value_name",
]


def layer_name(node: ir.Node) -> str:
    """How results and options name a layer: the node's name, else its first output's, else its op type."""
    return node.name or (node.outputs[0].name if node.outputs else node.op_type) or node.op_type


def _constant(node: ir.Node, index: int) -> tuple[ir.Value, ir.TensorProtocol]:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value.const_value is None:
        raise InvalidModelError(f"{node.op_type} {layer_name(node)}: input {index} is not a constant")
    return value, value.const_value


def const_input(node: ir.Node, index: int) -> ir.Value:
    """``node``'s input ``index``, which the layer checks found constant (a weight, a bias); InvalidModelError
    naming the layer when it is missing or not constant."""
    return _constant(node, index)[0]


def const_array(node: ir.Node, index: int) -> np.ndarray:
    """The values of ``node``'s constant input ``index`` (see ``const_input``)."""
    return _constant(node, index)[1].numpy()


def const_shape(node: ir.Node, index: int) -> tuple[int, ...]:
    """The shape of ``node``'s constant input ``index`` (see ``const_input``); a tensor's dims are ints."""
    return tuple(_constant(node, index)[1].shape.numpy())


def required_input(node: ir.Node, index: int) -> ir.Value:
    """``node``'s input ``index``, one the operator requires; InvalidModelError naming the layer when absent."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        raise InvalidModelError(f"{node.op_type} {layer_name(node)}: required input {index} is missing")
    return value


def value_name(value: ir.Value) -> str:
    """``value``'s name; InvalidModelError when it has none (a graph's tensors are named)."""
    if not value.name:
        raise InvalidModelError("a tensor of the graph has no name")
    return value.name


def input_name(node: ir.Node, index: int = 0) -> str:
    """The name of ``node``'s input ``index``; InvalidModelError naming the layer when it has none."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or not value.name:
        raise InvalidModelError(f"{node.op_type} {layer_name(node)}: input {index} is missing or unnamed")
    return value.name


def new_initializer(graph: ir.Graph, like: ir.Value, array: np.ndarray, counter: list[int]) -> ir.Value:
    """A new initializer holding ``array`` with ``like``'s dtype, named ``<like>__prunedN``
    (``counter`` numbers them)."""
    counter[0] += 1
    name = f"{like.name}__pruned{counter[0]}"
    while name in graph.initializers:
        counter[0] += 1
        name = f"{like.name}__pruned{counter[0]}"
    dtype = like.dtype if like.dtype is not None else ir.DataType.from_numpy(array.dtype)  # a weight has one
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=ir.tensor(array, name=name)
    )
    graph.register_initializer(value)
    return value


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove the initializers no node reads (the weights a rewrite replaced)."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


def prepared(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> ir.Model:
    """``model`` in onnx-ir: shapes inferred, every constant lifted to an initializer, nodes in topological order.

    ``input_shapes`` (the data's shapes at batch 1) stand in for the dynamic dims of the declared inputs
    while shapes are inferred (a dim of size 1 stays symbolic: it may be the batch), so that the values
    behind a dynamic H/W or sequence get shapes too; the graph keeps its declared inputs and outputs.
    """
    source = model
    if input_shapes:
        declared = {vi.name: vi for vi in model.graph.input}
        known = {}
        for name, shape in input_shapes.items():
            vi = declared.get(name)
            if vi is None or len(vi.type.tensor_type.shape.dim) != len(shape):
                continue
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
                continue
            known[name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (size if size > 1 else -1)
                for d, size in zip(dims, shape, strict=True)
            )
        source = _with_dims(model, known)
    try:
        inferred = onnx.shape_inference.infer_shapes(source, data_prop=True)
    except Exception as e:
        raise InvalidModelError(f"prune-channels: shape inference failed: {e}") from e
    if source is not model:
        for field in ("input", "output"):
            del getattr(inferred.graph, field)[:]
            getattr(inferred.graph, field).extend(getattr(model.graph, field))
    model_ir = ir.from_proto(inferred)
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model_ir)
    model_ir.graph.sort()
    return model_ir


def _with_dims(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy whose inputs declare ``shapes`` (-1: the dim stays as declared)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in copy.graph.input:
        if vi.name not in shapes:
            continue
        for axis, (d, size) in enumerate(zip(vi.type.tensor_type.shape.dim, shapes[vi.name], strict=False)):
            if size >= 0:
                d.Clear()
                d.dim_value = int(size)
            elif d.HasField("dim_value"):  # a declared -1
                d.Clear()
                d.dim_param = f"{vi.name}_dim{axis}"
    return copy


def lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every Constant node's value as an initializer (paddle2onnx stores weights that
    way; the prune stages find weights among the initializers)."""
    if not any(n.op_type == "Constant" for n in model.graph.node):
        return model
    model_ir = ir.from_proto(model)
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model_ir)
    return ir.to_proto(model_ir)


def clear_inner_shapes(graph: ir.Graph) -> None:
    """Forget the shapes of every value but the graph outputs: stale after a rewrite, recomputed by inference."""
    for node in graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None


def checked_model(model_ir: ir.Model, error: str) -> onnx.ModelProto:
    """``model_ir`` as a proto with inferred shapes if it passes the checks, else InvalidModelError(``error: why``)."""
    proto = ir.to_proto(model_ir)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        onnx.checker.check_model(proto, full_check=True)
        CpuTarget().session(proto.SerializeToString())
    except Exception as e:
        raise InvalidModelError(f"{error}: {e}") from e
    return proto
