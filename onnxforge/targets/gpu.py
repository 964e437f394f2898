"""NVIDIA targets: CUDA (CUDAExecutionProvider) and TensorRT (TensorrtExecutionProvider).

Both need the onnxruntime-gpu wheel (the ``gpu`` extra) and a visible GPU. TensorRT and CUDA run
int8 through QDQ graphs with symmetric int8 activations; fp16 (tensor cores, no calibration) is
measured beside it, and the same rule keeps the fastest within tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxforge.targets.base import ActivationType, QuantFormat, QuantMethod, QuantScheme, Target

__all__ = ["CudaTarget", "TensorrtTarget"]

# No square brackets: the CLI prints hints through rich, which would take "[gpu]" for markup.
_GPU_HINT = "pip install onnxruntime-gpu (the onnxforge 'gpu' extra) on a machine with an NVIDIA GPU"


@dataclass(frozen=True)
class CudaTarget(Target):
    name: str = "cuda"
    providers: tuple[str, ...] = ("CUDAExecutionProvider",)
    install_hint: str = _GPU_HINT

    def quant_candidates(self, model=None) -> list[QuantScheme]:
        return _gpu_candidates()


@dataclass(frozen=True)
class TensorrtTarget(Target):
    name: str = "tensorrt"
    providers: tuple[str, ...] = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    install_hint: str = _GPU_HINT + ", plus TensorRT libraries"

    def quant_candidates(self, model=None) -> list[QuantScheme]:
        return _gpu_candidates()


def _gpu_candidates() -> list[QuantScheme]:
    return [
        QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.INT8, per_channel=True),
        QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.INT8, method=QuantMethod.FP16),
    ]
