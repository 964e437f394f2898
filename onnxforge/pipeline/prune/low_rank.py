"""Low-rank factorization: a dense layer y = x W (W: K x N) becomes two thin ones, y = (x A) B.

Plain SVD: W = U S V', keep the r largest singular values, A = U_r S_r, B = V_r' (the best rank-r
W in Frobenius norm). Data-aware (with calibration data): the error that matters is on the layer's
*outputs*, ||X W - X A B||; with the input second moment X'X / n = L L' (Cholesky), that is
||L' W - L' A B||, so we take the SVD of L' W = U S V' and set A = L'^-1 U_r S_r, B = V_r'
(the best rank-r map for these inputs; PCA of the layer's inputs when W = I).

The rank per layer: ``energy`` e keeps the smallest r whose singular values hold a share e of the
total sum of squares (of W, or of the outputs when data-aware); ``ratio`` R keeps
r = max(1, round((1 - R) * min(K, N))). A layer is factored only when it pays in arithmetic:
r (K + N) <= ``max_cost`` * K N (default 0.7). Supported: MatMul with a constant 2-D weight, Gemm
(transA = 0), and 1x1 Conv (group 1). Whether the result is faster is measured, not assumed
(``latency`` in the result: p50 ratio at batch 1 and 32, interleaved).
Then, with evaluation data, the tolerance loop (onnxforge.pipeline.prune.backoff): keep more energy
(e -> 1 - (1 - e)/2) or remove a smaller share (R -> 0.75 R) until the quality gate holds
(QualityGateError, exit 4, when never).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.errors import QualityGateError, UsageError
from onnxforge.model_cost import count_parameters
from onnxforge.model_io import input_specs, load_model, save_model
from onnxforge.pipeline.calibration import SampleSet, load_samples
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.prune.activations import batches_of_values
from onnxforge.pipeline.prune.backoff import QualityCheck, back_off, shrink
from onnxforge.pipeline.prune.graph import checked_model, clear_inner_shapes, drop_unused_initializers, layer_name
from onnxforge.targets.feeds import batch_from_samples
from onnxforge.targets.latency import compare_latency

__all__ = ["RankRule", "LowRankConfig", "LowRankResult", "factorize_model", "low_rank"]


class RankRule(enum.Enum):
    ENERGY = "energy"
    RATIO = "ratio"


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    rule: RankRule = RankRule.ENERGY
    energy: float = 0.95
    ratio: float = 0.5
    max_cost: float = 0.7
    min_params: int = 4096
    calibration_data: Path | None = None
    calibration_samples: int = 256
    exclude_nodes: tuple[str, ...] = ()
    eval_data: Path | None = None
    metric: Metric = Metric.AUTO
    tolerance: float | None = None
    measure_latency: bool = True
    target: str = "cpu"  # where the quality gate and the timings run

    def __post_init__(self) -> None:
        if not 0.0 < self.energy < 1.0:
            raise UsageError(f"energy {self.energy}: must be in (0, 1), the share of singular-value energy kept")
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio {self.ratio}: must be in (0, 1), the share of each layer's rank removed")
        if not 0.0 < self.max_cost <= 1.0:
            raise UsageError(f"max_cost {self.max_cost}: must be in (0, 1]")



@dataclass
class LowRankResult:
    path: Path | None
    factored_layers: dict[str, dict]  # layer -> {"shape": [K, N], "rank": r, "energy": kept share}
    skipped_layers: dict[str, str]
    params_before: int
    params_after: int
    latency_speedup: dict[str, float] = field(default_factory=dict)  # "b1"/"b32" -> fp32 p50 / factored p50
    score_before: float | None = None
    score_after: float | None = None
    gate: str | None = None
    tried: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "factored_layers": self.factored_layers, "skipped_layers": self.skipped_layers,
            "params_before": self.params_before, "params_after": self.params_after,
            "latency_speedup": self.latency_speedup, "score_before": self.score_before,
            "score_after": self.score_after, "gate": self.gate, "tried": self.tried,
        }


def _as_matrix(node: ir.Node) -> np.ndarray | None:
    """The layer's weight as K x N with y = x W, or None when the layer is not supported."""
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    w = node.inputs[1].const_value.numpy()
    attrs = node.attributes
    if node.op_type == "MatMul" and w.ndim == 2:
        return w
    if node.op_type == "Gemm" and w.ndim == 2 and not (attrs.get("transA") and attrs["transA"].value):
        return w.T if attrs.get("transB") and attrs["transB"].value else w
    if node.op_type == "Conv" and w.ndim == 4 and w.shape[2:] == (1, 1):
        if (attrs["group"].value if "group" in attrs else 1) == 1:
            return w[:, :, 0, 0].T
    return None


def _rank(values: np.ndarray, config: LowRankConfig, shape: tuple[int, int]) -> tuple[int, float]:
    energy = np.cumsum(values**2) / max(float(np.sum(values**2)), 1e-30)
    if config.rule is RankRule.ENERGY:
        r = int(np.searchsorted(energy, config.energy - 1e-12) + 1)
    else:
        r = max(1, int(round((1.0 - config.ratio) * min(shape))))
    r = min(r, len(values))
    return r, float(energy[r - 1])


def _input_moments(model: onnx.ModelProto, nodes: list[ir.Node], samples: SampleSet) -> dict[str, np.ndarray]:
    """E[x x'] of each layer's input features (channels for a 1x1 Conv) over the calibration samples."""
    names = list(dict.fromkeys(n.inputs[0].name for n in nodes))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for _, values in batches_of_values(model, samples, names, 32):
        for name in names:
            x = values[name].astype(np.float64)
            rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if x.ndim == 4 else x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + len(rows)
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def _factor(w: np.ndarray, moment: np.ndarray | None, config: LowRankConfig) -> tuple[np.ndarray, np.ndarray, float]:
    k = w.shape[0]
    if moment is None:
        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        r, kept = _rank(s, config, w.shape)
        return u[:, :r] * s[:r], vt[:r], kept
    damp = 1e-6 * np.trace(moment) / k + 1e-12
    lower = np.linalg.cholesky(moment + damp * np.eye(k))
    u, s, vt = np.linalg.svd(lower.T @ w.astype(np.float64), full_matrices=False)
    r, kept = _rank(s, config, w.shape)
    a = np.linalg.solve(lower.T, u[:, :r] * s[:r])
    return a, vt[:r], kept


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array.astype(np.float32), name=name))
    graph.register_initializer(value)
    return value


def _rewrite(graph: ir.Graph, node: ir.Node, a: np.ndarray, b: np.ndarray) -> None:
    """Replace ``node`` (y = x W + bias) by x -> (x A) -> (. B + bias), keeping the output value."""
    x, y = node.inputs[0], node.outputs[0]
    tag = layer_name(node)
    if node.op_type == "Conv":
        attrs = [attr for key, attr in node.attributes.items() if key not in ("kernel_shape",)]
        first = ir.Node("", "Conv", [x, _const(graph, f"{tag}.lowrank_a", a.T[:, :, None, None])], attributes=attrs,
                        name=f"{tag}.lowrank_a")
        second_inputs = [first.outputs[0], _const(graph, f"{tag}.lowrank_b", b.T[:, :, None, None])]
        second_inputs += [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []
        second = ir.Node("", "Conv", second_inputs, name=f"{tag}.lowrank_b")
    elif node.op_type == "Gemm":
        first = ir.Node("", "MatMul", [x, _const(graph, f"{tag}.lowrank_a", a)], name=f"{tag}.lowrank_a")
        attrs = [attr for key, attr in node.attributes.items() if key != "transB"]
        second_inputs = [first.outputs[0], _const(graph, f"{tag}.lowrank_b", b)]
        second_inputs += [node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else []
        second = ir.Node("", "Gemm", second_inputs, attributes=attrs, name=f"{tag}.lowrank_b")
    else:
        first = ir.Node("", "MatMul", [x, _const(graph, f"{tag}.lowrank_a", a)], name=f"{tag}.lowrank_a")
        b_value = _const(graph, f"{tag}.lowrank_b", b)
        second = ir.Node("", "MatMul", [first.outputs[0], b_value], name=f"{tag}.lowrank_b")
    graph.insert_before(node, [first, second])
    out, name = second.outputs[0], y.name
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    y.name = None
    out.name = name  # downstream tools and users see the same tensor names


def factorize_model(
    model: onnx.ModelProto, config: LowRankConfig, calibration: SampleSet | None = None
) -> tuple[onnx.ModelProto, dict[str, dict], dict[str, str]]:
    """Factor every layer where it pays; returns (model, factored layers, skipped layers with reasons)."""
    model_ir = ir.from_proto(onnx.shape_inference.infer_shapes(model))
    graph = model_ir.graph
    candidates, skipped = [], {}
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
            continue
        w = _as_matrix(node)
        if w is None:
            if node.op_type != "Conv" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
                skipped[layer_name(node)] = "unsupported weight layout"
            continue
        if layer_name(node) in config.exclude_nodes or node.name in config.exclude_nodes:
            skipped[layer_name(node)] = "excluded"
        elif w.size < config.min_params:
            skipped[layer_name(node)] = f"only {w.size} weights"
        else:
            candidates.append((node, w))
    moments = {}
    if calibration is not None and candidates:
        moments = _input_moments(model, [n for n, _ in candidates], calibration)
    factored = {}
    for node, w in candidates:
        a, b, kept = _factor(w, moments.get(node.inputs[0].name), config)
        k, n = w.shape
        r = a.shape[1]
        if r * (k + n) > config.max_cost * k * n:
            cost = r * (k + n) / (k * n)
            skipped[layer_name(node)] = f"rank {r} of {min(k, n)} does not pay (cost {cost:.2f} of dense)"
            continue
        factored[layer_name(node)] = {"shape": [k, n], "rank": r, "energy": round(kept, 6)}
        _rewrite(graph, node, a, b)
    drop_unused_initializers(graph)  # the dense weights that were factored
    clear_inner_shapes(graph)
    return checked_model(model_ir, "low-rank: the factored model is invalid"), factored, skipped


def low_rank(
    input_path: str | os.PathLike, output: str | os.PathLike, config: LowRankConfig = LowRankConfig()
) -> LowRankResult:
    """Factor ``input_path``'s dense layers into ``output``; measures params, latency and (with eval) quality."""
    out = check_output_path(output, input_path, *paths_in(config))
    model = load_model(input_path)
    calibration = None
    if config.calibration_data is not None:
        calibration = load_samples(config.calibration_data, input_specs(model))
        calibration = calibration.take(slice(0, config.calibration_samples))
    check = QualityCheck.measure(model, config)
    target = check.target
    tried: list[dict] = []

    def attempt(attempt_config: LowRankConfig) -> tuple[tuple, bool]:
        candidate, factored, skipped = factorize_model(model, attempt_config, calibration)
        value = check.score(candidate)
        passes = check.passes(value)
        tried.append(
            {"energy": attempt_config.energy, "ratio": attempt_config.ratio, "layers": len(factored), "score": value,
             "passes": passes}
        )
        return (candidate, factored, skipped, value), passes

    def lower(attempt_config: LowRankConfig, outcome: tuple) -> LowRankConfig | None:
        if not outcome[1]:
            return None  # nothing was factored: keeping more cannot help
        if attempt_config.rule is RankRule.ENERGY:
            if attempt_config.energy > 0.9999:
                return None
            return replace(attempt_config, energy=1.0 - (1.0 - attempt_config.energy) / 2.0)
        ratio = shrink(attempt_config.ratio)
        return None if ratio is None else replace(attempt_config, ratio=ratio)

    kept = back_off(config, attempt, lower)
    candidate, factored, skipped, value = kept.outcome
    passed = kept.passed
    if not passed:
        candidate, factored, value = model, {}, check.reference_score
    save_model(candidate, out)
    speedup = {}
    if config.measure_latency and factored:
        sources = check.samples or calibration
        for b in (1, 32):
            feeds = batch_from_samples(sources.inputs, b) if sources is not None else None
            if feeds is None:
                break
            stats = compare_latency({"input": target.session(model.SerializeToString()),
                                     "factored": target.session(candidate.SerializeToString())}, feeds, rounds=10)
            speedup[f"b{b}"] = stats["input"].p50_ms / stats["factored"].p50_ms
    result = LowRankResult(
        path=out, factored_layers=factored, skipped_layers=skipped,
        params_before=count_parameters(model.graph, initializers_only=True),
        params_after=count_parameters(candidate.graph, initializers_only=True), latency_speedup=speedup,
        score_before=check.reference_score, score_after=value, gate=check.describe(), tried=tried,
    )
    if not passed:
        raise QualityGateError(
            f"no factorization meets the tolerance ({check.describe()}); the input model is saved at {out}",
            hint="loosen --tolerance, or pass --calibration for the data-aware factorization",
            best_path=str(out),
        )
    return result
