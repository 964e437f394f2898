"""Transformer fusions before quantization (onnxruntime.transformers.optimizer).

Rule: run the BERT optimizer (Attention, SkipLayerNormalization, EmbedLayerNormalization,
BiasGelu, ... into com.microsoft ops) and keep its graph only when it fused something, judged by
the count of those fused ops going up. The optimizer fuses TorchScript-exported eager-attention
BERTs; on dynamo or sdpa exports it finds no pattern (measured), and then the unfused graph is
kept unchanged, so a half-rewritten graph never reaches quantization.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from dataclasses import dataclass

import onnx

__all__ = ["FUSED_OPS", "FusionResult", "fuse_transformer", "looks_like_transformer"]

FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
)


@dataclass
class FusionResult:
    model: onnx.ModelProto
    fused: dict[str, int]  # op -> nodes added by the fusion (empty: nothing fused, model unchanged)
    note: str


def looks_like_transformer(model: onnx.ModelProto) -> bool:
    """A Softmax and MatMuls: where the BERT fusions can apply (cheap gate before the optimizer)."""
    ops = Counter(n.op_type for n in model.graph.node)
    return ops["Softmax"] > 0 and ops["MatMul"] >= 4


def _counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.op_type in FUSED_OPS)


def fuse_transformer(model: onnx.ModelProto) -> FusionResult:
    """``model`` with BERT fusions applied when they fused something; otherwise ``model`` as given."""
    from onnxruntime.transformers.optimizer import optimize_model

    before = _counts(model)
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            optimized = optimize_model(onnx.ModelProto.FromString(model.SerializeToString()), model_type="bert",
                                       num_heads=0, hidden_size=0, opt_level=0)
        fused_model = optimized.model
    except Exception as e:  # the fusions are an optimisation: an optimizer failure keeps the graph
        return FusionResult(model, {}, f"transformer fusions skipped: optimizer failed ({type(e).__name__})")
    finally:
        quiet.setLevel(level)
    after = _counts(fused_model)
    gained = {op: after[op] - before[op] for op in after if after[op] > before[op]}
    structural = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization")
    if not any(op in gained for op in structural):
        return FusionResult(model, {}, "transformer fusions found no Attention/SkipLayerNorm pattern "
                                       "(e.g. a dynamo or sdpa export): graph kept unfused")
    summary = ", ".join(f"{n} {op}" for op, n in sorted(gained.items()))
    return FusionResult(fused_model, gained, f"transformer fusions applied before quantizing: {summary}")
