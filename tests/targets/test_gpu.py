"""GPU targets: exit 3 with an install hint where onnxruntime-gpu or a GPU is missing, never a
silent CPU fall back; the real CUDA path runs only where both exist (marked gpu)."""

from __future__ import annotations

import dataclasses

import onnxruntime as ort
import pytest
from conftest import random_images

from onnxforge.errors import TargetUnavailableError
from onnxforge.targets.cpu import CpuTarget

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = "TensorrtExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(HAS_CUDA, reason="CUDAExecutionProvider is available here")
@pytest.mark.parametrize("target", ["cuda", "tensorrt"])
def test_gpu_target_without_gpu_is_exit_3_with_hint(cli, classifier_path, target):
    code, stdout, stderr = cli("profile", classifier_path, "--target", target, "--min-seconds", "0.01")
    assert code == 3
    assert "Traceback" not in stderr and stdout == ""
    assert "ExecutionProvider" in stderr and "pip install onnxruntime-gpu" in stderr


@dataclasses.dataclass(frozen=True)
class _AsksForXnnpack(CpuTarget):
    """A target whose provider list onnxruntime cannot honour on the PyPI Linux wheel."""

    name: str = "xnnpack-test"

    def provider_options(self):
        return [("XnnpackExecutionProvider", {}), ("CPUExecutionProvider", {})]


@pytest.mark.skipif("XnnpackExecutionProvider" in ort.get_available_providers(), reason="XNNPACK is available")
def test_silent_provider_fallback_is_refused(classifier_path):
    # onnxruntime only warns and runs on the CPU; the target must refuse that session.
    with pytest.warns(UserWarning), pytest.raises(TargetUnavailableError, match="XnnpackExecutionProvider"):
        _AsksForXnnpack().session(classifier_path)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider and an NVIDIA GPU")
def test_cuda_per_op_profile_places_nodes_on_cuda(classifier_path):
    from onnxforge.targets.op_profile import OpProfileConfig, profile_ops

    result = profile_ops(classifier_path, {"x": random_images(4, seed=1)}, OpProfileConfig(target="cuda", runs=20))
    assert result.expected_provider == "CUDAExecutionProvider"
    placed = {p.provider: p.nodes for p in result.placement}
    assert placed.get("CUDAExecutionProvider", 0) > 0
    assert result.latency.runs == 20


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs onnxruntime-gpu with TensorRT libraries and an NVIDIA GPU")
def test_tensorrt_session_starts(classifier_path):
    from onnxforge.targets import get_target

    session = get_target("tensorrt").session(classifier_path)
    assert session.get_providers()[0] == "TensorrtExecutionProvider"
