"""CPU target (CPUExecutionProvider).

On x86 CPUs with VNNI (AVX512-VNNI or AVX-VNNI) onnxruntime's fast int8 kernels take uint8
activations with int8 weights: QDQ U8S8 per-channel ran 2.8-3.6x faster than fp32 on a residual
CNN here, while QDQ with int8 activations (ORT's default) ran only ~1.0-1.3x and QOperator S8S8
0.24x. The candidates below are measured, not assumed; this order only sets what is tried first.

Models whose weights sit mostly in MatMul (transformers) get their own candidates first: dynamic
int8 (``quantize_dynamic``: int8 weights, activation ranges computed per run) and static QDQ on the
weight MatMuls only (outputs float: MatMulIntegerToFloat), each also with SmoothQuant scale
migration (MiniLM: worst held-out sentence's cosine 0.988 -> 0.993 for dynamic, 0.989 -> 0.993
static, measured), static with percentile ranges, and int4 weight-only (MatMulNBits) where this
onnxruntime runs it; of the static all-op schemes only the first is kept (all-op QDQ lost MiniLM's
quality, cosine ~0.8-0.86). On a CNN dynamic int8 runs through ConvInteger at 0.2-0.3x fp32 and a
MatMul-only scope quantizes nothing, so they are left out by the rule instead of by measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxforge.targets.base import ActivationType, QuantFormat, QuantMethod, QuantScheme, QuantScope, Target

__all__ = ["CpuTarget", "has_matmul_weights", "has_vnni", "matmul_dominated"]


@dataclass(frozen=True)
class CpuTarget(Target):
    name: str = "cpu"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Measured at batch 1, 1 thread (AVX512-VNNI EPYC, 2026-12-08): the digits CNN at 66 M MACs ran 1.25 ms
    # and at 4.2 M MACs (75% of channels pruned) 0.125 ms with the same 15 kernels: 18 µs per M MACs and
    # ~3.3 µs per kernel, i.e. one kernel costs as much as ~180 k MACs. Static U8S8 int8 of the whole model
    # ran 2.5-3.05x its fp32 speed: int8 MACs ~3x faster.
    kernel_overhead_macs: int = 180_000
    int8_mac_speedup: float = 3.0

    def quant_candidates(self, model: onnx.ModelProto | None = None) -> list[QuantScheme]:
        reduce = _is_x86() and not has_vnni()
        u8, s8 = ActivationType.UINT8, ActivationType.INT8
        static = [
            QuantScheme(format=QuantFormat.QDQ, activations=u8, per_channel=True, reduce_range=reduce),
            QuantScheme(format=QuantFormat.QDQ, activations=u8, per_channel=False, reduce_range=reduce),
            QuantScheme(format=QuantFormat.QDQ, activations=s8, per_channel=True),
            QuantScheme(format=QuantFormat.QOPERATOR, activations=u8, per_channel=True, reduce_range=reduce),
            # only the op types measured faster in int8 here, the rest in float without Q/DQ (op_classes)
            QuantScheme(format=QuantFormat.QDQ, activations=u8, per_channel=True, reduce_range=reduce,
                        scope=QuantScope.PROFILED),
        ]
        if model is not None and matmul_dominated(model):
            return [*self.matmul_candidates(), static[0]]
        return static

    def matmul_candidates(self) -> list[QuantScheme]:
        reduce = _is_x86() and not has_vnni()
        u8 = ActivationType.UINT8
        dynamic = QuantScheme(format=QuantFormat.QOPERATOR, activations=u8, per_channel=True, reduce_range=reduce,
                              method=QuantMethod.DYNAMIC)
        matmul = QuantScheme(format=QuantFormat.QDQ, activations=u8, per_channel=True, reduce_range=reduce,
                             scope=QuantScope.WEIGHT_MATMUL)
        schemes = [
            dataclasses.replace(dynamic, smooth=True),
            dataclasses.replace(matmul, smooth=True),
            dynamic,
            matmul,
            dataclasses.replace(matmul, smooth=True, percentile=True),
        ]
        if self.runs_matmul_nbits():
            schemes.append(QuantScheme(format=QuantFormat.QOPERATOR, activations=u8, method=QuantMethod.INT4))
        return schemes


def matmul_dominated(model: onnx.ModelProto) -> bool:
    """True when MatMul nodes with a constant weight hold more weight elements than Conv and Gemm nodes.

    Counted on initializers only (no shape inference): a cheap proxy for where the compute is.
    Gemm counts against: quantize_dynamic has no integer Gemm kernel, so it would stay fp32.
    """
    sizes = {init.name: _numel(init.dims) for init in model.graph.initializer}
    matmul = conv = 0
    for node in model.graph.node:
        weights = sum(sizes.get(name, 0) for name in node.input[1:2])
        if node.op_type == "MatMul":
            matmul += max(weights, sizes.get(node.input[0], 0))
        elif node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            conv += weights
    return matmul > 0 and matmul > conv


def has_matmul_weights(model: onnx.ModelProto) -> bool:
    """True when some MatMul multiplies by a constant weight (an initializer or a Constant node): what
    dynamic quantization and int4 (MatMulNBits) quantize; a conv-only graph has none."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return any(node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in constants
               for node in model.graph.node)


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.cache
def has_vnni() -> bool:
    """True when the CPU has an 8-bit dot-product instruction (AVX512-VNNI or AVX-VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags
