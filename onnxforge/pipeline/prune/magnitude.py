"""Magnitude sparsity: zero the smallest weights of Conv, ConvTranspose, Gemm and MatMul.

Rule: with sparsity s, a weight w is zeroed when |w| < t, where t is the s-quantile of |w| over
all eligible weights (``global``) or over each layer's own weights (``per-layer``). Biases,
normalization parameters and layers with fewer than ``min_params`` weights are left alone.

Dense kernels gain no speed from zeros: what sparsity buys is a smaller compressed file (we
report the gzip size) and, on sparse-aware runtimes, speed. With evaluation data, a tolerance
loop (onnxforge.pipeline.prune.backoff) lowers the sparsity until the quality gate holds, keeping
the sparsest model that passes.
"""

from __future__ import annotations

import enum
import gzip
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.errors import UsageError
from onnxforge.model_io import save_model
from onnxforge.pipeline.codec import JsonResult, option
from onnxforge.pipeline.data_spec import set_data_fields
from onnxforge.pipeline.evaluate import set_metric_field
from onnxforge.pipeline.normalize import load_stage_input
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.prune.backoff import QualityCheck, back_off
from onnxforge.pipeline.prune.checks import CheckFields, gate_missed
from onnxforge.pipeline.prune.graph import layer_name, lift_constants

__all__ = ["MagnitudePruneConfig", "MagnitudePruneResult", "Scope", "prune_magnitude", "sparsify_model"]

_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


class Scope(enum.Enum):
    GLOBAL = "global"
    PER_LAYER = "per-layer"


@dataclass(frozen=True, kw_only=True)
class MagnitudePruneConfig(CheckFields):
    sparsity: float = option(0.5, help="fraction of weights to zero")
    scope: Scope = option(Scope.PER_LAYER, help="one threshold per layer or one for the whole model")
    min_params: int = option(64, help="layers with fewer weights are left alone")
    exclude_nodes: tuple[str, ...] = option((), help="node names left dense")
    max_samples: int | None = option(  # bounds every use of the data: samples fit and eval samples scored
        None,
        help="eval samples scored at most",
    )

    def __post_init__(self) -> None:
        set_data_fields(self, "eval_data")  # a str or Path from the Python API becomes a DataSpec
        set_metric_field(self)  # and a metric's name or file.py:function a Metric / UserMetric
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError("--max-samples must be at least 1")
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"--sparsity {self.sparsity}: must be in [0, 1)")



@dataclass
class MagnitudePruneResult(JsonResult):
    """What prune_magnitude() did. The output path is not saved (the caller has it); whether quality
    was measured is derived (``json_extra``)."""

    path: Path | None = field(metadata={"json": False})
    requested_sparsity: float
    achieved_sparsity: float
    pruned_layers: list[str]
    skipped_layers: list[str]
    bytes: int
    gzip_bytes_before: int
    gzip_bytes_after: int
    score_before: float | None = None
    score_after: float | None = None
    gate: str | None = None
    tried: list[dict] = field(default_factory=list)
    quality: str = ""  # what the scores rest on, or "quality NOT measured: ..."
    notes: list[str] = field(default_factory=list)  # what was normalized on load

    def json_extra(self) -> dict[str, Any]:
        return {"quality_measured": self.score_after is not None}


def _eligible_weights(graph: ir.Graph, config: MagnitudePruneConfig) -> tuple[list[tuple[str, ir.Value]], list[str]]:
    chosen, skipped = [], []
    seen: set[int] = set()
    for node in graph:
        index = _WEIGHT_OPS.get(node.op_type)
        if index is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= index:
            continue
        weight = node.inputs[index]
        name = layer_name(node)
        if weight is None or weight.const_value is None:
            continue  # activations (MatMul of two tensors) are not weights
        if node.name in config.exclude_nodes:
            skipped.append(f"{name} (excluded)")
            continue
        if weight.const_value.size < config.min_params:
            skipped.append(f"{name} (only {weight.const_value.size} weights)")
            continue
        if id(weight) in seen:
            continue  # a weight shared by several nodes is pruned once
        seen.add(id(weight))
        chosen.append((name, weight))
    return chosen, skipped


def sparsify_model(
    model: onnx.ModelProto, config: MagnitudePruneConfig
) -> tuple[onnx.ModelProto, float, list[str], list[str]]:
    """Zero the smallest weights. Returns (model, achieved sparsity over eligible weights, pruned, skipped)."""
    ir_model = ir.from_proto(lift_constants(model))
    weights, skipped = _eligible_weights(ir_model.graph, config)
    # every eligible weight is a constant (_eligible_weights)
    arrays = {name: tensor.numpy() for name, value in weights if (tensor := value.const_value) is not None}
    if config.scope is Scope.GLOBAL and arrays:
        everything = np.concatenate([np.abs(a).ravel() for a in arrays.values()])
        thresholds = {name: np.quantile(everything, config.sparsity) for name in arrays}
    else:
        thresholds = {name: np.quantile(np.abs(a), config.sparsity) for name, a in arrays.items()}
    zeros = total = 0
    for name, value in weights:
        array = arrays[name]
        pruned = np.where(np.abs(array) < thresholds[name], np.zeros_like(array), array)
        zeros += int(np.count_nonzero(pruned == 0))
        total += pruned.size
        value.const_value = ir.tensor(pruned, name=value.name)
    return ir.to_proto(ir_model), (zeros / total if total else 0.0), [n for n, _ in weights], skipped


def _gzip_size(data: bytes) -> int:
    return len(gzip.compress(data, compresslevel=6))


def prune_magnitude(
    input_path: str | os.PathLike, output: str | os.PathLike, config: MagnitudePruneConfig = MagnitudePruneConfig(),
    *, progress: Progress = ignore,
) -> MagnitudePruneResult:
    """Sparsify ``input_path`` into ``output``. With ``eval_data``, lower sparsity until the gate holds."""
    out = check_output_path(output, input_path, *paths_in(config))
    loaded = load_stage_input(input_path, "prune")
    model = loaded.model
    before = model.SerializeToString()
    check, _ = QualityCheck.measure(model, config, progress=progress)
    tried: list[dict] = []

    def attempt(sparsity: float) -> tuple[tuple, bool]:
        step(progress, f"try {len(tried) + 1}: sparsifying", message=f"sparsity {sparsity:.3f}")
        pruned, achieved, layers, skipped = sparsify_model(model, replace(config, sparsity=sparsity))
        serialized = pruned.SerializeToString()
        check.runs(serialized, "prune")
        entry: dict[str, float | bool | str | None] = {"sparsity": round(sparsity, 4), "achieved": round(achieved, 4)}
        value = check.score(serialized)
        passes = check.passes(value, serialized)
        if check.measured:
            entry["score"] = value
            entry["passes"] = passes
            entry["gate"] = check.verdict_note(serialized)
        tried.append(entry)
        return (pruned, achieved, layers, skipped, serialized, value), passes

    # Try the requested sparsity, then back off geometrically (x0.75) until the gate holds; the 5% floor
    # applies to the sparsity just tried (a channel ratio stops one step earlier, before going under it).
    kept = back_off(config.sparsity, attempt, lambda sparsity, _: None if sparsity < 0.05 else sparsity * 0.75)
    pruned, achieved, layers, skipped, serialized, value = kept.outcome
    passed = kept.passed
    if not passed:
        pruned, achieved, value = model, 0.0, check.reference_score
        serialized = before
    save_model(pruned, out)
    result = MagnitudePruneResult(
        path=out,
        requested_sparsity=config.sparsity,
        achieved_sparsity=achieved,
        pruned_layers=layers,
        skipped_layers=skipped,
        bytes=len(serialized),
        gzip_bytes_before=_gzip_size(before),
        gzip_bytes_after=_gzip_size(serialized),
        score_before=check.reference_score,
        score_after=value,
        gate=check.describe(),
        tried=tried,
        quality=check.quality_note(),
        notes=loaded.notes,
    )
    if not passed:
        raise gate_missed(
            check, tried, tries=f"sparsity down to {kept.last:.3f}", kept="unpruned", out=out, result=result,
            label="sparsity", remedies="or exclude sensitive layers with --exclude",
        )
    return result
