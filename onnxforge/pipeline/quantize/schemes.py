"""Quantization schemes as the CLI and recipes spell them, and the codec hook that uses that spelling.

``FORMAT-ACTsWEIGHTS-GRANULARITY[-reduce-range]`` (``qdq-u8s8-per-channel``: QDQ format, uint8
activations, int8 weights, one scale per output channel), ``dynamic-s8-GRANULARITY`` (int8 MatMul
weights, activation ranges computed per run) and ``fp16``. A scheme's id is its label in lower case
with dashes, so the two can never disagree.
"""

from __future__ import annotations

import re

from onnxforge.errors import OnnxForgeError, RecipeError, UsageError
from onnxforge.pipeline import codec
from onnxforge.targets import ActivationType, QuantFormat, QuantMethod, QuantScheme

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


def parse_scheme(text: str) -> QuantScheme:
    """``FORMAT-ACTsWEIGHTS-GRANULARITY[-reduce-range]``, e.g. ``qdq-u8s8-per-channel`` (weights are int8)."""
    text = text.strip().lower()
    if text == "fp16":
        return QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.INT8, method=QuantMethod.FP16)
    dynamic = _DYNAMIC_ID.match(text)
    if dynamic:
        return QuantScheme(format=QuantFormat.QOPERATOR, activations=ActivationType.UINT8,
                           per_channel=dynamic["gran"] == "per-channel", reduce_range=bool(dynamic["reduce"]),
                           method=QuantMethod.DYNAMIC)
    match = _SCHEME_ID.match(text)
    if not match:
        raise UsageError(
            f"unknown quantization scheme {text!r}",
            hint="e.g. qdq-u8s8-per-channel, qdq-s8s8-per-tensor, qoperator-u8s8-per-channel-reduce-range, "
            "dynamic-s8-per-channel, fp16",
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
    """The static QDQ scheme with ``scheme``'s activations and granularity: the graph whose
    QuantizeLinear/DequantizeLinear pairs the per-node error is measured on."""
    return QuantScheme(
        format=QuantFormat.QDQ,
        activations=scheme.activations,
        per_channel=scheme.per_channel,
        reduce_range=scheme.reduce_range,
    )
