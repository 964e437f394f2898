"""Targets: availability, sessions, and the quantization schemes each one proposes."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from onnxforge.errors import InvalidModelError, TargetUnavailableError, UsageError
from onnxforge.targets import TARGETS, ActivationType, CpuTarget, CudaTarget, QuantFormat, get_target


def test_registry_and_lookup():
    assert {"cpu", "cuda", "tensorrt"} <= set(TARGETS)
    assert get_target("cpu") is TARGETS["cpu"]
    target = CpuTarget()
    assert get_target(target) is target
    with pytest.raises(UsageError):
        get_target("quantum")


def test_cpu_is_available_and_makes_sessions(classifier_path, classifier):
    cpu = get_target("cpu")
    assert cpu.unavailable_reason() is None
    assert cpu.session(classifier_path, threads=1).get_inputs()[0].name == "x"
    assert cpu.session(classifier.SerializeToString()).get_outputs()[0].name == "logits"


def test_a_model_onnxruntime_rejects_is_invalid_model_error(tmp_path):
    import onnx.helper as h
    from onnx import TensorProto

    node = h.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    with pytest.raises(InvalidModelError, match="onnxruntime cannot load it"):
        CpuTarget().session(model.SerializeToString())


def test_cpu_candidates_measure_u8s8_first():
    schemes = CpuTarget().quant_candidates()
    assert len(schemes) >= 2
    assert schemes[0].format is QuantFormat.QDQ and schemes[0].activations is ActivationType.UINT8
    assert len({s.label for s in schemes}) == len(schemes)  # labels identify candidates


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_unavailable_says_why(classifier_path):
    cuda = CudaTarget()
    assert "CUDAExecutionProvider" in cuda.unavailable_reason()
    with pytest.raises(TargetUnavailableError) as info:
        cuda.session(classifier_path)
    assert info.value.exit_code == 3
