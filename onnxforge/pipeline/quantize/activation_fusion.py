"""Hard-swish written out as four ops, fused into one HardSwish for the static candidates' graph.

Rule. ``x * clip(x + 3, 0, 6) / 6`` (Add, Clip, Mul, Div: how Paddle and older exports write
MobileNetV3-style activations) is ``HardSwish(x) = x * max(0, min(1, x / 6 + 1 / 2))``, the same
function; onnxscript's ``fuse_hardswish_rules`` match it (constants 3, 0, 6 and 6 checked) and the
Add-Clip-Div half as ``HardSigmoid(1/6, 1/2)``. Between int8 convs each of the four ops is a float
kernel reading and writing the whole activation: on PP-OCRv4's recognizer (28 of them) they held
about a third of the profiled int8 candidate's time, and the fused graph ran its int8 candidate
1.64x the input instead of 1.39x (fp32 alone: 1.04x), measured interleaved.

HardSwish exists from opset 14: an older model is upgraded with onnx's version converter first. The
fused graph is kept only when something fused and its outputs match the input graph's on calibration
samples (atol 1e-4, rtol 1e-3); otherwise the graph is left as it was and a note says why.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxforge.errors import first_line
from onnxforge.model_io import default_opset

__all__ = ["HARDSWISH_OPSET", "ActivationFusion", "fuse_activations", "may_fuse"]

HARDSWISH_OPSET = 14


@dataclass(frozen=True)
class ActivationFusion:
    """The fused model (None when nothing fused or it was refused) and a note for the result."""

    model: onnx.ModelProto | None
    note: str | None
    fused: int = 0


def _count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("HardSwish", "HardSigmoid") for n in model.graph.node)


def may_fuse(model: onnx.ModelProto) -> bool:
    """A cheap look before any rewrite (or data read): a Clip feeding a Mul or Div (the pattern's middle)."""
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    return any(n.op_type == "Clip" and consumers.get(n.output[0], set()) & {"Mul", "Div"} for n in model.graph.node)


def fuse_activations(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]]) -> ActivationFusion:
    """``model`` with its written-out hard-swish (and hard-sigmoid) activations fused (see the module doc),
    checked on ``samples`` (feeds) against ``model``."""
    if not may_fuse(model):
        return ActivationFusion(None, None)
    import onnx_ir as ir
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import fuse_hardswish_rules

    before = _count(model)
    try:
        source = model
        opset = default_opset(model)
        if opset is not None and opset < HARDSWISH_OPSET:
            source = onnx.version_converter.convert_version(model, HARDSWISH_OPSET)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            graph = ir.from_proto(source)
            rewrite(graph, pattern_rewrite_rules=fuse_hardswish_rules())
            fused = ir.to_proto(graph)
        fused = onnx.shape_inference.infer_shapes(fused)  # the fused ops' outputs typed, as the quantizer needs
        onnx.checker.check_model(fused)
    except Exception as e:  # an optimisation: a failure keeps the graph
        return ActivationFusion(None, f"hard-swish fusion skipped: {type(e).__name__}: {first_line(e, 200)}")
    count = _count(fused) - before
    if count <= 0:
        return ActivationFusion(None, None)
    checked = ""
    if samples:
        from onnxforge.parity import Tolerance, compare_models

        parity = compare_models(model.SerializeToString(), fused.SerializeToString(), [dict(s) for s in samples],
                                Tolerance(atol=1e-4, rtol=1e-3))
        if not parity.ok:
            return ActivationFusion(None, f"hard-swish fusion not used: its outputs differ ({parity.summary()})")
        checked = f"; outputs match on {len(samples)} batch(es) (max abs error {parity.max_abs:.2g})"
    upgraded = f", opset {opset} upgraded to {HARDSWISH_OPSET}" if opset is not None and opset < HARDSWISH_OPSET else ""
    note = (f"{count} hard-swish/hard-sigmoid activation(s) written as Add, Clip, (Mul,) Div fused into HardSwish/"
            f"HardSigmoid for the static candidates (float kernels between int8 ops: four become one{upgraded})"
            f"{checked}")
    return ActivationFusion(fused, note, count)
