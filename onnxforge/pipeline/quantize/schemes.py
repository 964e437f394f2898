"""Quantization schemes as the CLI and recipes spell them, and the codec hook that uses that spelling.

``FORMAT-ACTsWEIGHTS-GRANULARITY[-reduce-range]`` (``qdq-u8s8-per-channel``: QDQ format, uint8
activations, int8 weights, one scale per output channel), ``dynamic-s8-GRANULARITY`` (int8 MatMul
weights, activation ranges computed per run), ``int4`` (MatMul weights in 4-bit blocks) and ``fp16``.
Options follow, in this order: ``-matmul`` (static: only MatMuls with a constant weight, outputs
float) or ``-profiled`` (static: only the op types measured faster in int8 on the target,
quantize.op_classes), ``-smooth`` (SmoothQuant scale migration first), ``-percentile`` (static:
percentile calibration) and ``-int8-embeddings`` (embedding tables int8, per-row scales), e.g.
``qdq-u8s8-per-channel-matmul-smooth-int8-embeddings``. A scheme's id is its label in lower case with
dashes, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from onnxforge.errors import OnnxForgeError, RecipeError, UsageError
from onnxforge.pipeline import codec
from onnxforge.targets import ActivationType, QuantFormat, QuantMethod, QuantScheme, QuantScope

__all__ = ["DYNAMIC_OP_TYPES", "parse_scheme", "qdq_twin", "scheme_id"]


_SCHEME_ID = re.compile(
    r"^(?P<format>qdq|qoperator)-(?P<act>u8|s8)s8-(?P<gran>per-channel|per-tensor)(?P<reduce>-reduce-range)?$"
)
_DYNAMIC_ID = re.compile(r"^dynamic-s8-(?P<gran>per-channel|per-tensor)(?P<reduce>-reduce-range)?$")
# quantize_dynamic's integer kernels: MatMulInteger/DynamicQuantizeMatMul, QAttention, DynamicQuantizeLSTM.
# Conv is left out on purpose (ConvInteger ran 0.2-0.3x fp32 on this CPU); Gather (embeddings) too.
DYNAMIC_OP_TYPES = ("MatMul", "Attention", "LSTM")


def scheme_id(scheme: QuantScheme) -> str:
    """The scheme as the CLI spells it, e.g. ``qdq-u8s8-per-channel``, ``dynamic-s8-per-channel``, ``fp16``:
    its label (``QDQ U8S8 per-channel``) in lower case with dashes, so the two can never disagree."""
    return scheme.label.lower().replace(" ", "-")


# (suffix, the QuantScheme field it sets, its value, the methods it applies to), in the order a label writes them
_OPTIONS: tuple[tuple[str, str, object, tuple[QuantMethod, ...]], ...] = (
    ("-matmul", "scope", QuantScope.WEIGHT_MATMUL, (QuantMethod.STATIC,)),
    ("-profiled", "scope", QuantScope.PROFILED, (QuantMethod.STATIC,)),
    ("-smooth", "smooth", True, (QuantMethod.STATIC, QuantMethod.DYNAMIC)),
    ("-percentile", "percentile", True, (QuantMethod.STATIC,)),
    ("-int8-embeddings", "int8_embeddings", True, (QuantMethod.STATIC, QuantMethod.DYNAMIC, QuantMethod.INT4)),
)


def parse_scheme(text: str) -> QuantScheme:
    """``FORMAT-ACTsWEIGHTS-GRANULARITY[-reduce-range][-matmul|-profiled][-smooth][-percentile][-int8-embeddings]``,
    ``dynamic-s8-GRANULARITY[...]``, ``int4[...]`` or ``fp16``; e.g. ``qdq-u8s8-per-channel`` (weights int8)."""
    text = text.strip().lower()
    base = text
    options: dict[str, Any] = {}  # QuantScheme field -> value (the scope, or a flag turned on)
    for suffix, name, value, _ in reversed(_OPTIONS):
        if base.endswith(suffix):
            if name in options:
                raise UsageError(f"quantization scheme {text!r}: -matmul and -profiled are two scopes; give one")
            base = base[: -len(suffix)]
            options[name] = value
    scheme = _parse_base(base, text)
    wrong = [s for s, name, _, methods in _OPTIONS if name in options and scheme.method not in methods]
    if wrong:
        raise UsageError(f"quantization scheme {text!r}: {wrong[0][1:]} does not apply to {scheme.method.value}")
    return dataclasses.replace(scheme, **options)


def _parse_base(base: str, text: str) -> QuantScheme:
    if base == "fp16":
        return QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.INT8, method=QuantMethod.FP16)
    if base == "int4":
        return QuantScheme(format=QuantFormat.QOPERATOR, activations=ActivationType.UINT8, method=QuantMethod.INT4)
    dynamic = _DYNAMIC_ID.match(base)
    if dynamic:
        return QuantScheme(format=QuantFormat.QOPERATOR, activations=ActivationType.UINT8,
                           per_channel=dynamic["gran"] == "per-channel", reduce_range=bool(dynamic["reduce"]),
                           method=QuantMethod.DYNAMIC)
    match = _SCHEME_ID.match(base)
    if not match:
        raise UsageError(
            f"unknown quantization scheme {text!r}",
            hint="e.g. qdq-u8s8-per-channel, qdq-u8s8-per-channel-matmul-smooth, dynamic-s8-per-channel, "
            "dynamic-s8-per-channel-smooth-int8-embeddings, int4, fp16",
        )
    return QuantScheme(
        format=QuantFormat(match["format"]),
        activations=ActivationType.UINT8 if match["act"] == "u8" else ActivationType.INT8,
        per_channel=match["gran"] == "per-channel",
        reduce_range=bool(match["reduce"]),
    )


def _decode_scheme(value: object, where: str, base: object) -> QuantScheme:
    if not isinstance(value, str):
        raise RecipeError(f"{where}: expected a scheme name such as qdq-u8s8-per-channel, got {value!r}")
    try:
        return parse_scheme(value)
    except OnnxForgeError as e:
        raise RecipeError(f"{where}: {e.message}", hint=e.hint) from e


codec.register_type(QuantScheme, scheme_id, _decode_scheme)


def qdq_twin(scheme: QuantScheme) -> QuantScheme:
    """The static QDQ scheme with ``scheme``'s activations, granularity, scope and smoothing: the graph
    whose QuantizeLinear/DequantizeLinear pairs the per-node error is measured on. A dynamic scheme's
    twin quantizes weight MatMuls only, as dynamic int8 does."""
    dynamic = scheme.method is QuantMethod.DYNAMIC
    return QuantScheme(
        format=QuantFormat.QDQ,
        activations=scheme.activations,
        per_channel=scheme.per_channel,
        reduce_range=scheme.reduce_range,
        scope=QuantScope.WEIGHT_MATMUL if dynamic else scheme.scope,
        smooth=scheme.smooth,
        percentile=scheme.percentile,
    )
