"""Schemes a model's opset can hold, and the op behind a failed candidate.

Per-channel QDQ writes ``DequantizeLinear`` with an ``axis`` (per-channel weights and the biases
quantized with them), which exists from opset 13. On an older model (PaddleOCR's direction
classifier is opset 11) every per-channel candidate failed to load. Such a model is upgraded with
onnx's version converter and the upgrade is checked — onnx's checker, then the same outputs as the
original on the data, within 1e-4 — before any scheme uses it; when it cannot be, the per-channel
QDQ schemes are not proposed, and a note says why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxforge.errors import UsageError, first_line
from onnxforge.model_io import default_opset
from onnxforge.targets import QuantFormat, QuantMethod, QuantScheme

__all__ = ["PER_CHANNEL_QDQ_OPSET", "failing_op", "opset_for_schemes"]

PER_CHANNEL_QDQ_OPSET = 13


def _needs_axis(scheme: QuantScheme) -> bool:
    return scheme.method is QuantMethod.STATIC and scheme.format is QuantFormat.QDQ and scheme.per_channel


def opset_for_schemes(
    model: onnx.ModelProto, schemes: Sequence[QuantScheme], feeds: Mapping[str, np.ndarray] | None
) -> tuple[onnx.ModelProto, list[QuantScheme], list[str]]:
    """(the model to quantize, the schemes it can take, notes): see the module doc."""
    opset = default_opset(model)
    needing = [s for s in schemes if _needs_axis(s)]
    if opset is None or opset >= PER_CHANNEL_QDQ_OPSET or not needing:
        return model, list(schemes), []
    try:
        upgraded = onnx.version_converter.convert_version(model, PER_CHANNEL_QDQ_OPSET)
        onnx.checker.check_model(upgraded)
        check = ""
        if feeds is not None:
            from onnxforge.parity import Tolerance, compare_models

            parity = compare_models(model.SerializeToString(), upgraded.SerializeToString(), [dict(feeds)],
                                    Tolerance(atol=1e-4, rtol=1e-3))
            if not parity.ok:
                raise ValueError(f"the upgraded model's outputs differ: {parity.summary()}")
            check = f"; same outputs on the data (max abs error {parity.max_abs:.2g})"
        note = (f"opset {opset} upgraded to {PER_CHANNEL_QDQ_OPSET} for the per-channel schemes (DequantizeLinear "
                f"takes an axis from opset {PER_CHANNEL_QDQ_OPSET}): onnx checker passed{check}")
        return upgraded, list(schemes), [note]
    except Exception as e:  # the converter has no adapter for some op, or the outputs changed
        kept = [s for s in schemes if not _needs_axis(s)]
        reason = (
            f"per-channel QDQ needs opset {PER_CHANNEL_QDQ_OPSET} (DequantizeLinear's axis) and this opset-{opset} "
            f"model could not be upgraded ({type(e).__name__}: {first_line(e, 200)})"
        )
        if not kept:
            raise UsageError(
                reason,
                hint="ask for a per-tensor scheme (--scheme qdq-u8s8-per-tensor) or a QOperator "
                "one (--scheme qoperator-u8s8-per-channel), or re-export the model at opset 13+",
            ) from e
        return model, kept, [f"{reason}: {', '.join(s.label for s in needing)} not measured"]


_OP_PATTERNS = (
    re.compile(r'In Node, \("[^"]*", (\w+),'),  # onnxruntime: invalid graph
    re.compile(r"\bOp \((\w+)\)"),  # onnxruntime: kernel or type errors
    re.compile(r"\bop(?:erator)?[ _]type[ :=]+'?(\w+)"),
    re.compile(r"for operator (\w+)"),
)


def failing_op(message: str) -> str | None:
    """The op type an onnxruntime/onnx error message names, if it names one."""
    for pattern in _OP_PATTERNS:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return None
