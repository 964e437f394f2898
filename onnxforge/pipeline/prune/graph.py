"""Reading and editing graphs, shared by the structural prune stages (channels, repair, low rank).

Rule: a rewrite never edits a weight in place. It registers a new initializer under a fresh name
and points the node at it; afterwards the initializers nothing uses any more are dropped and the
inferred shapes of inner values are cleared (shape inference recomputes them). The rewritten model
must pass strict shape inference, ``onnx.checker`` and an onnxruntime session, or the stage fails
with InvalidModelError.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from onnxforge.errors import InvalidModelError
from onnxforge.targets.cpu import CpuTarget

__all__ = [
    "checked_model",
    "clear_inner_shapes",
    "drop_unused_initializers",
    "layer_name",
    "new_initializer",
    "prepared",
]


def layer_name(node: ir.Node) -> str:
    """How results and options name a layer: the node's name, else its first output's, else its op type."""
    return node.name or (node.outputs[0].name if node.outputs else node.op_type) or node.op_type


def new_initializer(graph: ir.Graph, like: ir.Value, array: np.ndarray, counter: list[int]) -> ir.Value:
    """A new initializer holding ``array`` with ``like``'s dtype, named ``<like>__prunedN``
    (``counter`` numbers them)."""
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


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove the initializers no node reads (the weights a rewrite replaced)."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


def prepared(model: onnx.ModelProto) -> ir.Model:
    """``model`` in onnx-ir: shapes inferred, every constant lifted to an initializer, nodes in topological order."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise InvalidModelError(f"prune-channels: shape inference failed: {e}") from e
    model_ir = ir.from_proto(inferred)
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model_ir)
    model_ir.graph.sort()
    return model_ir


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
