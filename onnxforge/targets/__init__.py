"""Where a model runs: one module per target, the latency profiler, availability checks."""

from __future__ import annotations

from onnxforge.errors import UsageError
from onnxforge.targets.base import ActivationType, QuantFormat, QuantMethod, QuantScheme, QuantScope, Target
from onnxforge.targets.cpu import CpuTarget
from onnxforge.targets.gpu import CudaTarget, TensorrtTarget
from onnxforge.targets.mobile import MobileTarget

__all__ = [
    "TARGETS",
    "ActivationType",
    "CpuTarget",
    "CudaTarget",
    "MobileTarget",
    "QuantFormat",
    "QuantMethod",
    "QuantScheme",
    "QuantScope",
    "Target",
    "TensorrtTarget",
    "get_target",
]

TARGETS: dict[str, Target] = {t.name: t for t in (CpuTarget(), CudaTarget(), TensorrtTarget(), MobileTarget())}


def get_target(name: str | Target) -> Target:
    """The target called ``name`` (a Target passes through). Unknown names are a UsageError."""
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None
