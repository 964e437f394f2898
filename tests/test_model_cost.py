"""count_parameters / count_params_and_macs: the one parameter count inspect and the prune stages use."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.model_cost import ComputeCost, compute_cost, count_parameters, count_params_and_macs


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


def _conv_model(quantized: bool) -> onnx.ModelProto:
    """x [1, 2, 8, 8] -> Conv 3x3 (4 out) -> Relu; ``quantized``: the weight read through DequantizeLinear
    and the activation through Q/DQ, as a static QDQ quantization writes it."""
    inits = [numpy_helper.from_array(np.zeros((), np.float32) + 0.1, "s"),
             numpy_helper.from_array(np.zeros((), np.uint8), "z")]
    if quantized:
        inits += [numpy_helper.from_array(np.ones((4, 2, 3, 3), np.int8), "wq"),
                  numpy_helper.from_array(np.zeros((), np.int8), "wz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "s", "wz"], ["w"]),
                 helper.make_node("Conv", ["xd", "w"], ["h"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"]),
                 helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["y"])]
    else:
        inits += [numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_qdq_conv_counts_its_macs_as_integer_and_folds_its_pairs():
    macs = 4 * 2 * 9 * 64
    assert compute_cost(_conv_model(False)) == ComputeCost(float_macs=macs, integer_macs=0, kernels=1)  # Conv+Relu
    # the input's Q and the output's DQ stay (they convert at the graph's edges), the rest fold into QLinearConv
    assert compute_cost(_conv_model(True)) == ComputeCost(float_macs=0, integer_macs=macs, kernels=3)
    assert count_params_and_macs(_conv_model(True))[1] == macs  # was 0: a QDQ weight is not an initializer


def test_a_conv_behind_a_contrib_node_still_counts_its_output_size():
    """QLinearAdd (com.microsoft) leaves its output's shape unknown to ONNX shape inference; the QLinearConv
    after it (stride 2) gets its spatial size from its input's."""
    s, z = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z")
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.int8), "w")
    wz = numpy_helper.from_array(np.zeros((4,), np.int8), "wz")
    ws = numpy_helper.from_array(np.full((4,), 0.1, np.float32), "ws")
    nodes = [
        helper.make_node("QLinearAdd", ["a", "s", "z", "a", "s", "z", "s", "z"], ["b"], domain="com.microsoft"),
        helper.make_node("QLinearConv", ["b", "s", "z", "w", "ws", "wz", "s", "z"], ["y"], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], [s, z, w, wz, ws],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    assert compute_cost(model).integer_macs == 4 * 2 * 9 * 16
