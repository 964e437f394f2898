"""What computes a model's output, read from its graph: whether it is a linear layer's scores.

A CTC recognizer may return raw class scores ``[T, N, C]`` without its softmax (ddddocr's captcha reader
ends in ``Gemm -> Reshape``): nothing in the values says "classes" the way a distribution does, but the
graph does. An output is a linear head's when, walking back from it through ops that only move values
(Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Identity) and a bias ``Add`` of a constant, the op
reached is a matrix product (MatMul, Gemm, or their quantized or fused forms). A transformer's hidden
state ends in a normalization or a residual Add of two computed tensors, a detector's boxes in a Concat:
neither is a linear head.
"""

from __future__ import annotations

import onnx

__all__ = ["is_linear_head"]

_MOVES_VALUES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
_MATRIX_PRODUCTS = {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat", "QGemm",
                    "DynamicQuantizeMatMul"}
_MAX_STEPS = 16


def is_linear_head(model: onnx.ModelProto, output: str) -> bool:
    """Whether the graph output named ``output`` is a matrix product's result, seen through reshapes and a
    constant bias (see the module doc)."""
    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    constants = {i.name for i in graph.initializer} | {
        name for node in graph.node if node.op_type == "Constant" for name in node.output}
    name = output
    for _ in range(_MAX_STEPS):
        node = producers.get(name)
        if node is None:
            return False
        if node.op_type in _MATRIX_PRODUCTS:
            return True
        if node.op_type in _MOVES_VALUES and node.input:
            name = node.input[0]
        elif node.op_type == "Add" and len(node.input) == 2 and sum(i in constants for i in node.input) == 1:
            name = next(i for i in node.input if i not in constants)
        else:
            return False
    return False
