"""NVIDIA targets: CUDA (CUDAExecutionProvider) and TensorRT (TensorrtExecutionProvider).

Both need the onnxruntime-gpu wheel (the ``gpu`` extra) and a visible GPU. TensorRT and CUDA run
int8 through QDQ graphs with symmetric int8 activations, so that is the candidate they measure.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxforge.targets.base import ActivationType, QuantFormat, QuantScheme, Target

__all__ = ["CudaTarget", "TensorrtTarget"]

# No square brackets: the CLI prints hints through rich, which would take "[gpu]" for markup.
_GPU_HINT = "pip install onnxruntime-gpu (the onnxforge 'gpu' extra) on a machine with an NVIDIA GPU"


@dataclass(frozen=True)
class CudaTarget(Target):
    name: str = "cuda"
    providers: tuple[str, ...] = ("CUDAExecutionProvider",)
    install_hint: str = _GPU_HINT

    def quant_candidates(self) -> list[QuantScheme]:
        return [QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.INT8, per_channel=True)]


@dataclass(frozen=True)
class TensorrtTarget(Target):
    name: str = "tensorrt"
    providers: tuple[str, ...] = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    install_hint: str = _GPU_HINT + ", plus TensorRT libraries"

    def quant_candidates(self) -> list[QuantScheme]:
        return [QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.INT8, per_channel=True)]
