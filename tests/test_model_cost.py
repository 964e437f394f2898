"""count_parameters / count_params_and_macs: the one parameter count inspect and the prune stages use."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.model_cost import count_parameters, count_params_and_macs


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    shift = helper.make_tensor("shift", TensorProto.FLOAT, [3], [0.0, 1.0, 2.0])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Constant", [], ["c"], value=shift),
        helper.make_node("Add", ["h", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constants_count_unless_initializers_only():
    model = _model()
    assert count_parameters(model.graph) == 12 + 3
    assert count_parameters(model.graph, initializers_only=True) == 12


def test_macs_of_a_matmul():
    assert count_params_and_macs(_model()) == (12, 12)
