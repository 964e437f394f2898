"""The fp32 graphs one quantize() call builds its candidates from.

- ``fp32``: the input model pre-processed (calibrate.preprocess): the reference every candidate is
  scored and timed against.
- ``base``: what static, int4 and fp16 candidates quantize: ``fp32`` with written-out hard-swish
  activations fused (activation_fusion), for transformers with residual sums kept out of a slow
  SkipLayerNormalization kernel (skip_layer_norm) when the target measures it slower.
- ``fused``: transformers with a dynamic candidate only, what those quantize: the transformer fusions
  (transformer_fusion) when they fused something, matched the outputs and left every Attention
  ready for QAttention (static QDQ cannot quantize a fused Attention, whose QKV projection would
  stay fp32: those candidates keep ``base``).

On transformers, ``base`` and ``fused`` then run their token-wise layers on real tokens only
(token_packing, ``remove_padding``) when the outputs do not show padded positions.

Smoothed variants (smooth_quant) of either are built on demand by the candidate run, from
calibration samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxforge.pipeline.quantize.activation_fusion import fuse_activations, may_fuse
from onnxforge.pipeline.quantize.calibrate import CalibrationData, name_nodes, preprocess
from onnxforge.pipeline.quantize.config import QuantizeConfig
from onnxforge.pipeline.quantize.skip_layer_norm import residual_sums, should_keep_unfused
from onnxforge.pipeline.quantize.token_packing import pack_tokens
from onnxforge.pipeline.quantize.transformer_fusion import fuse_transformer, looks_like_transformer, padded_batch
from onnxforge.targets import QuantMethod, QuantScheme

__all__ = ["Graphs", "prepare_graphs", "qattention_ready"]

_PARITY_SAMPLES = 4


@dataclass(frozen=True)
class Graphs:
    fp32: Path
    base: Path
    fused: Path | None = None
    transformer: bool = False

    @property
    def rewritten(self) -> bool:
        """True when ``base`` is not the reference graph itself."""
        return self.base != self.fp32


def qattention_ready(model: onnx.ModelProto) -> bool:
    """True when every com.microsoft Attention can become QAttention: a constant packed weight, no
    ``qkv_hidden_sizes`` and no ``attention_bias`` (QAttention has no such input)."""
    constants = {i.name for i in model.graph.initializer}
    attentions = [n for n in model.graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    return bool(attentions) and all(
        len(n.input) > 1 and n.input[1] in constants
        and not any(a.name == "qkv_hidden_sizes" for a in n.attribute)
        and not (len(n.input) > 5 and n.input[5])
        for n in attentions
    )


def prepare_graphs(
    model: onnx.ModelProto, folder: Path, config: QuantizeConfig, target, data: CalibrationData, notes: list[str],
    schemes: Sequence[QuantScheme] = (),
) -> Graphs:
    """Pre-process ``model`` into ``folder`` and build the graphs above (notes say what was done). The
    fused graph is built only when one of ``schemes`` is dynamic: nothing else reads it, and fusing
    and checking it took 37 of 372 s on PP-OCRv4's recognizer, whose candidates are all static."""
    fp32 = preprocess(model, folder, notes)
    base = _fused_activations(fp32, folder, data, notes)
    if not looks_like_transformer(model):
        return Graphs(fp32, base)
    reference = onnx.load(str(fp32))
    sums, slowdown = should_keep_unfused(target) if config.residual_sums else (False, None)
    singles = [{k: np.asarray(v)[None] for k, v in sample.items()}
               for sample in data.calib.take(slice(0, min(8, len(data.calib)))).samples()]
    packed_notes: list[str] = []

    def packed(graph: onnx.ModelProto, label: str) -> tuple[onnx.ModelProto, bool]:
        if not config.remove_padding:
            return graph, False
        result = pack_tokens(graph, singles)
        packed_notes.append(f"{label}: {result.note}")
        return result.model, result.packed > 0

    start = onnx.load(str(base))  # hard-swish fused, when any
    rewritten, count = residual_sums(start) if sums else (start, 0)
    rewritten, packed_base = packed(rewritten, "unfused graph")
    if count or packed_base:
        base = folder / "fp32_rewritten.onnx"
        onnx.save_model(rewritten, str(base))
        name_nodes(base)
    if count:
        notes.append(
            f"SkipLayerNormalization ran {slowdown:.1f}x slower than Add + LayerNormalization on target "
            f"{target.name!r}: {count} residual Add(s) written as Sum so onnxruntime keeps them unfused"
        )
    fused = None
    fusion_wanted = config.transformer_fusion and any(s.method is QuantMethod.DYNAMIC for s in schemes)
    batch = data.statistics_batch() if fusion_wanted else None
    if fusion_wanted and batch is None:
        notes.append(f"transformer fusions skipped: checking them would not fit ({data.refusal('statistics')})")
    elif fusion_wanted and batch is not None:
        samples = list(data.batches(_PARITY_SAMPLES, batch)())
        padded = padded_batch(singles)
        if padded is not None:
            samples.append(padded)
        fusion = fuse_transformer(reference, samples, attention=config.fuse_attention)
        notes.append(fusion.note)
        if fusion.fused and (not config.fuse_attention or qattention_ready(fusion.model)):
            graph = fusion.model
            if sums:
                graph, _ = residual_sums(graph)
            graph, _ = packed(graph, "fused graph")
            fused = folder / "fp32_fused.onnx"
            onnx.save_model(graph, str(fused))
            name_nodes(fused)
        elif fusion.fused:
            notes.append("fused Attention cannot become QAttention (mask or weights): dynamic candidates use the "
                         "unfused graph")
    notes.extend(packed_notes)
    return Graphs(fp32, base, fused, transformer=True)


def _fused_activations(fp32: Path, folder: Path, data: CalibrationData, notes: list[str]) -> Path:
    """``fp32`` with its written-out hard-swish activations fused (activation_fusion), checked on calibration
    batches; ``fp32`` itself when nothing fused or the check does not fit in memory."""
    model = onnx.load(str(fp32))
    if not may_fuse(model):
        return fp32
    batch = data.statistics_batch()
    if batch is None:
        notes.append(f"hard-swish fusion skipped: checking it would not fit ({data.refusal('statistics')})")
        return fp32
    fusion = fuse_activations(model, list(data.batches(_PARITY_SAMPLES, batch)()))
    if fusion.note:
        notes.append(fusion.note)
    if fusion.model is None:
        return fp32
    path = folder / "fp32_activations_fused.onnx"
    onnx.save_model(fusion.model, str(path))
    name_nodes(path)
    return path
