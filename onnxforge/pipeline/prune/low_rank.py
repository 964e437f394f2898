"""Low-rank factorization: a dense layer y = x W + b (W: K x N) becomes two thin ones, y = (x A) B + b'.

Plain SVD (no data): W = U S V', keep the r largest singular values, A = U_r S_r, B = V_r' (the best
rank-r W in Frobenius norm). Data-aware (with calibration data): what matters is the layer's *outputs*
on its real inputs. Inputs have a mean mu and a covariance C (centred statistics: the PCA of the
activations; an uncentred second moment lets the mean dominate and put rank 1 on real models). With
C = L L' (Cholesky, of C + a small damping), ||(X - mu)(W - A B)|| = ||L'(W - A B)||: take the SVD
of L'W = U S V' and set A = L'^-1 U_r S_r, B = V_r'; the mean's part of the output, mu (W - A B), is
folded into the bias (b' = b + mu (W - A B)), so it is kept exactly. C is only positive semi-definite
(fewer samples than features, dead channels) and rounding can leave it indefinite: when Cholesky
refuses it, the damping grows x10 a few times, and then C = Q D Q' (eigendecomposition, D clipped at
the damping) gives L' = D^1/2 Q', which whitens just as well (``_whitening``).

The rank per layer: ``energy`` e keeps the smallest r whose singular values hold a share e of the
total sum of squares (of W, or of the output *variance* when data-aware); ``ratio`` R keeps
r = max(1, round((1 - R) * min(K, N))). A layer is factored only when it pays in arithmetic:
r (K + N) <= ``max_cost`` * K N (default 0.7). Supported: MatMul with a constant 2-D weight, Gemm
(transA = 0), and 1x1 Conv (group 1). Each factored layer's output error is measured on held-out
samples (``output_error``: ||y - y'|| / ||y - mean y||, from their statistics).

Then the tolerance loop (onnxforge.pipeline.prune.backoff) on the eval data, else on held-out
calibration samples (onnxforge.pipeline.prune.checks): keep more energy (e -> 1 - (1 - e)/2) or remove
a smaller share (R -> 0.75 R) until the quality gate holds (QualityGateError, exit 4, when never).
Whether the result is faster is measured, not assumed: input and result timed interleaved at the
model's own batch size; with ``objective`` latency (the default) a try measured slower than its input
misses like a quality miss (two thin layers can run slower than one dense one). Nothing is written
until all of that is known.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.errors import UsageError
from onnxforge.model_cost import count_parameters
from onnxforge.model_io import input_specs, save_model
from onnxforge.pipeline.calibration import SampleSet, StreamedSamples
from onnxforge.pipeline.codec import JsonResult, option
from onnxforge.pipeline.data_spec import DataSpec, open_data, set_data_fields
from onnxforge.pipeline.evaluate import set_metric_field
from onnxforge.pipeline.normalize import load_stage_input
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.prune.activations import batches_of_values, token_rows
from onnxforge.pipeline.prune.backoff import QualityCheck, back_off, shrink
from onnxforge.pipeline.prune.checks import BackOffFields, Objective, gate_missed
from onnxforge.pipeline.prune.graph import (
    checked_model,
    clear_inner_shapes,
    const_array,
    drop_unused_initializers,
    input_name,
    layer_name,
    lift_constants,
)

__all__ = ["LowRankConfig", "LowRankResult", "RankRule", "factorize_model", "layer_candidates", "low_rank"]


class RankRule(enum.Enum):
    ENERGY = "energy"
    RATIO = "ratio"


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(BackOffFields):
    rule: RankRule = option(RankRule.ENERGY, help="how each layer's rank is chosen")
    energy: float = option(0.95, help="singular-value energy kept by the energy rule")
    ratio: float = option(0.5, help="fraction of each layer's rank to remove (the ratio rule)")
    max_cost: float = option(0.7, help="factor a layer only when its factors cost at most this share of it")
    min_params: int = option(4096, help="layers with fewer weights are left alone")
    calibration_data: DataSpec | None = option(None, help="samples for the data-aware factorization")
    calibration_samples: int = option(256, help="calibration samples fit at most")
    max_samples: int | None = option(  # bounds every use of the data: samples fit and eval samples scored
        None,
        help="bounds every use of the data: samples fit and eval samples scored",
    )
    exclude_nodes: tuple[str, ...] = option((), help="node names left dense")
    measure_latency: bool = option(
        True,
        help="time the factored model against its input (objective latency always times it: its gate needs it)",
    )

    def __post_init__(self) -> None:
        set_data_fields(self, "calibration_data", "eval_data")  # a str or Path from the Python API becomes a DataSpec
        set_metric_field(self)  # and a metric's name or file.py:function a Metric / UserMetric
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError("--max-samples must be at least 1")
        if not 0.0 < self.energy < 1.0:
            raise UsageError(f"energy {self.energy}: must be in (0, 1), the share of singular-value energy kept")
        if not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio {self.ratio}: must be in (0, 1), the share of each layer's rank removed")
        if not 0.0 < self.max_cost <= 1.0:
            raise UsageError(f"max_cost {self.max_cost}: must be in (0, 1]")



@dataclass
class LowRankResult(JsonResult):
    """What low_rank() did. The output path is not saved (the caller has it); the measured speedup
    and whether quality was measured are derived (``json_extra``)."""

    path: Path | None = field(metadata={"json": False})
    factored_layers: dict[str, dict]  # layer -> {"shape": [K, N], "rank": r, "energy": kept share, "output_error"}
    skipped_layers: dict[str, str]
    params_before: int
    params_after: int
    latency_speedup: dict[str, float] = field(default_factory=dict)  # "b<model batch>" -> input p50 / factored p50
    score_before: float | None = None
    score_after: float | None = None
    gate: str | None = None
    tried: list[dict] = field(default_factory=list)
    quality: str = ""  # what the scores rest on, or "quality NOT measured: ..."
    speed: dict | None = None
    notes: list[str] = field(default_factory=list)  # what was normalized on load

    def json_extra(self) -> dict[str, Any]:
        return {
            "quality_measured": self.score_after is not None,
            "measured_speedup": self.speed["speedup"] if self.speed else None,
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
        r = max(1, round((1.0 - config.ratio) * min(shape)))
    r = min(r, len(values))
    return r, float(energy[r - 1])


@dataclass
class _Moments:
    """Sums over the rows of a layer's input features, taken about ``origin`` (the first batch's mean, so
    that float32 products keep the covariance of inputs whose mean is large): count, sum d, sum d d'
    with d = x - origin."""

    origin: np.ndarray
    count: int = 0
    total: np.ndarray | float = 0.0
    outer: np.ndarray | float = 0.0

    def add(self, rows: np.ndarray) -> None:
        d = rows - self.origin.astype(rows.dtype)
        self.count += len(d)
        self.total = self.total + d.sum(0, dtype=np.float64)
        self.outer = self.outer + (d.T @ d).astype(np.float64)

    @property
    def mean(self) -> np.ndarray:
        return self.origin + self.total / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        shift = self.total / max(self.count, 1)
        return self.outer / max(self.count, 1) - np.outer(shift, shift)

    @property
    def second(self) -> np.ndarray:
        mean = self.mean
        return self.covariance + np.outer(mean, mean)


def _input_moments(model: onnx.ModelProto, nodes: list[ir.Node], samples: SampleSet) -> dict[str, _Moments]:
    """Moments of each layer's input features (channels for a 1x1 Conv) over ``samples``, batch by batch."""
    names = list(dict.fromkeys(input_name(n) for n in nodes))
    moments: dict[str, _Moments] = {}
    for _, values, mask in batches_of_values(model, samples, names, 8):
        for name in names:
            x = values[name].astype(np.float32)
            rows = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]) if x.ndim == 4 else token_rows(x, mask)
            if name not in moments:
                moments[name] = _Moments(rows.mean(0, dtype=np.float64))
            moments[name].add(rows)
    return moments


def _decompose(w: np.ndarray, moments: _Moments | None) -> tuple:
    """(L' or None, U, S, V') of W, or of L'W with the inputs' covariance C = L L' (what every rank reuses)."""
    w64 = w.astype(np.float64)
    if moments is None:
        return (None, *np.linalg.svd(w64, full_matrices=False))
    upper = _whitening(moments.covariance)
    return (upper, *np.linalg.svd(upper @ w64, full_matrices=False))


CHOLESKY_TRIES = 4  # damping 1e-6, 1e-5, 1e-4, 1e-3 of the mean variance before the eigendecomposition


def _whitening(covariance: np.ndarray) -> np.ndarray:
    """An invertible U with U'U = C + damping I (C: the inputs' covariance, K x K): L' of a Cholesky
    factor, with the damping grown x10 while Cholesky refuses C (not positive definite: PP-OCR's
    detector), else D^1/2 Q' from C = Q D Q' with D clipped at the damping. Never raises on a
    symmetric C of finite numbers."""
    k = covariance.shape[0]
    damp = 1e-6 * max(float(np.trace(covariance)), 1e-30) / k + 1e-12
    for grown in (damp * 10.0**i for i in range(CHOLESKY_TRIES)):
        try:
            return np.linalg.cholesky(covariance + grown * np.eye(k)).T
        except np.linalg.LinAlgError:
            continue
    values, vectors = np.linalg.eigh(covariance)  # both read C's lower triangle
    return np.sqrt(np.maximum(values, 0.0) + damp)[:, None] * vectors.T


def _factor(
    w: np.ndarray, moments: _Moments | None, config: LowRankConfig, decomposition: tuple | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """(A, B, bias shift or None, kept energy) for ``w`` (K x N); see the module doc."""
    w64 = w.astype(np.float64)
    upper, u, s, vt = decomposition or _decompose(w, moments)
    if upper is None or moments is None:  # no moments, no whitening
        r, kept = _rank(s, config, w.shape)
        return u[:, :r] * s[:r], vt[:r], None, kept
    r, kept = _rank(s, config, w.shape)
    a = np.linalg.solve(upper, u[:, :r] * s[:r])
    b = vt[:r]
    return a, b, moments.mean @ (w64 - a @ b), kept


def _output_error(w: np.ndarray, a: np.ndarray, b: np.ndarray, shift: np.ndarray | None, held: _Moments) -> float:
    """||y - y'|| / ||y - mean y|| over the held-out rows, from their moments (y' = x A B + shift)."""
    d = w.astype(np.float64) - a @ b
    shift = np.zeros(w.shape[1]) if shift is None else shift
    error = float(np.sum(d * (held.second @ d))) - 2 * float(held.mean @ d @ shift) + float(shift @ shift)
    w64 = w.astype(np.float64)
    variance = float(np.sum(w64 * (held.covariance @ w64)))
    return float(np.sqrt(max(error, 0.0) / max(variance, 1e-30)))


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(array.astype(np.float32), name=name))
    graph.register_initializer(value)
    return value


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _shifted_bias(graph: ir.Graph, node: ir.Node, bias: ir.Value | None, shift: np.ndarray | None, n: int, tag: str):
    """The second layer's bias: the layer's own plus the folded mean shift (None: no bias at all)."""
    if shift is None:
        return bias
    if bias is None:
        return _const(graph, f"{tag}.lowrank_bias", shift)
    old = const_array(node, 2).astype(np.float64)  # bias is node's input 2
    return _const(graph, f"{tag}.lowrank_bias", old + shift.reshape((1,) * max(old.ndim - 1, 0) + (n,)))


def _rewrite(graph: ir.Graph, node: ir.Node, a: np.ndarray, b: np.ndarray, shift: np.ndarray | None = None) -> None:
    """Replace ``node`` (y = x W + bias) by x -> (x A) -> (. B + bias + shift), keeping the output value."""
    x, y = node.inputs[0], node.outputs[0]
    tag = layer_name(node)
    n = b.shape[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if node.op_type == "Conv":
        attrs = [attr for key, attr in node.attributes.items() if key not in ("kernel_shape",)]
        first = ir.Node("", "Conv", [x, _const(graph, f"{tag}.lowrank_a", a.T[:, :, None, None])], attributes=attrs,
                        name=f"{tag}.lowrank_a")
        second_inputs = [first.outputs[0], _const(graph, f"{tag}.lowrank_b", b.T[:, :, None, None])]
        new_bias = _shifted_bias(graph, node, bias, shift, n, tag)
        second_inputs += [new_bias] if new_bias is not None else []
        second = ir.Node("", "Conv", second_inputs, name=f"{tag}.lowrank_b")
    elif node.op_type == "Gemm":
        first = ir.Node("", "MatMul", [x, _const(graph, f"{tag}.lowrank_a", a)], name=f"{tag}.lowrank_a")
        attrs = [attr for key, attr in node.attributes.items() if key not in ("transB", "beta")]
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        if shift is not None and bias is not None and beta == 0.0:
            bias, beta = None, 1.0  # C is multiplied by 0: it is not a bias
        if shift is not None:
            shift = shift * alpha / (beta if bias is not None else 1.0)
            beta = beta if bias is not None else 1.0
        second_inputs = [first.outputs[0], _const(graph, f"{tag}.lowrank_b", b)]
        new_bias = _shifted_bias(graph, node, bias, shift, n, tag)
        second_inputs += [new_bias] if new_bias is not None else []
        attrs.append(ir.AttrFloat32("beta", beta))
        second = ir.Node("", "Gemm", second_inputs, attributes=attrs, name=f"{tag}.lowrank_b")
    else:
        first = ir.Node("", "MatMul", [x, _const(graph, f"{tag}.lowrank_a", a)], name=f"{tag}.lowrank_a")
        b_value = _const(graph, f"{tag}.lowrank_b", b)
        second = ir.Node("", "MatMul", [first.outputs[0], b_value], name=f"{tag}.lowrank_b")
    nodes = [first, second]
    if node.op_type == "MatMul" and shift is not None:
        nodes.append(ir.Node("", "Add", [second.outputs[0], _const(graph, f"{tag}.lowrank_shift", shift)],
                             name=f"{tag}.lowrank_shift"))
    graph.insert_before(node, nodes)
    out, name = nodes[-1].outputs[0], y.name
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    y.name = None
    out.name = name  # downstream tools and users see the same tensor names


def layer_candidates(model: onnx.ModelProto, config: LowRankConfig) -> tuple[list[str], dict[str, str]]:
    """(the input names of the layers that may be factored, skipped layers with reasons)."""
    graph = ir.from_proto(lift_constants(model)).graph
    names, skipped = [], {}
    for node, _w, reason in _candidates(graph, config):
        if reason:
            skipped[layer_name(node)] = reason
        else:
            names.append(input_name(node))
    return list(dict.fromkeys(names)), skipped


def _candidates(graph: ir.Graph, config: LowRankConfig):
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
            continue
        w = _as_matrix(node)
        if w is None:
            if node.op_type != "Conv" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
                yield node, None, "unsupported weight layout"
            continue
        if layer_name(node) in config.exclude_nodes or node.name in config.exclude_nodes:
            yield node, w, "excluded"
        elif w.size < config.min_params:
            yield node, w, f"only {w.size} weights"
        else:
            yield node, w, None


def factorize_model(
    model: onnx.ModelProto,
    config: LowRankConfig,
    calibration: SampleSet | None = None,
    *,
    fit: dict[str, _Moments] | None = None,
    held: dict[str, _Moments] | None = None,
    decompositions: dict[str, tuple] | None = None,
) -> tuple[onnx.ModelProto, dict[str, dict], dict[str, str]]:
    """Factor every layer where it pays; returns (model, factored layers, skipped layers with reasons).

    Data-aware with ``calibration`` (or its input moments ``fit``, computed once by the caller);
    with ``held`` (moments on held-out samples) each factored layer's ``output_error`` is measured.
    ``decompositions`` (layer -> SVD, filled on first use) lets a caller trying several ranks decompose once.
    """
    model = lift_constants(model)
    model_ir = ir.from_proto(onnx.shape_inference.infer_shapes(model))
    graph = model_ir.graph
    candidates, skipped = [], {}
    for node, w, reason in _candidates(graph, config):
        if reason:
            skipped[layer_name(node)] = reason
        else:
            candidates.append((node, w))
    if fit is None and calibration is not None and candidates:
        fit = _input_moments(model, [n for n, _ in candidates], calibration)
    fit = fit or {}
    factored = {}
    for node, w in candidates:
        moments = fit.get(input_name(node))
        decomposition = None
        if decompositions is not None:
            decomposition = decompositions.get(layer_name(node)) or _decompose(w, moments)
            decompositions[layer_name(node)] = decomposition
        a, b, shift, kept = _factor(w, moments, config, decomposition)
        k, n = w.shape
        r = a.shape[1]
        if r * (k + n) > config.max_cost * k * n:
            cost = r * (k + n) / (k * n)
            skipped[layer_name(node)] = f"rank {r} of {min(k, n)} does not pay (cost {cost:.2f} of dense)"
            continue
        info = {"shape": [k, n], "rank": r, "energy": round(kept, 6)}
        if held and input_name(node) in held:
            info["output_error"] = round(_output_error(w, a, b, shift, held[input_name(node)]), 6)
        factored[layer_name(node)] = info
        _rewrite(graph, node, a, b, shift)
    drop_unused_initializers(graph)  # the dense weights that were factored
    clear_inner_shapes(graph)
    return checked_model(model_ir, "low-rank: the factored model is invalid"), factored, skipped


def _remedies(config: LowRankConfig) -> str:
    """What else may pass the gate, never asking for what was given."""
    if config.calibration_data is None:
        return "or pass --calibration for the data-aware factorization"
    keep_more = (f"raise --energy (now {config.energy:g})" if config.rule is RankRule.ENERGY
                 else f"lower --ratio (now {config.ratio:g})")
    return f"{keep_more}, or --exclude the layers that lose the most"


def low_rank(
    input_path: str | os.PathLike, output: str | os.PathLike, config: LowRankConfig = LowRankConfig(),
    *, progress: Progress = ignore,
) -> LowRankResult:
    """Factor ``input_path``'s dense layers into ``output``, keeping more rank until the quality gate holds.

    Quality is gated on the eval data, else on held-out calibration samples (then not used to fit);
    without either it is not measured and the result says so. Measured and returned: parameters, each
    factored layer's rank, kept energy and (with data) output error on held-out samples, every try, and
    the kept model's speed vs the input, timed interleaved at the model's own batch size. The file is
    written last.
    """
    out = check_output_path(output, input_path, *paths_in(config))
    loaded = load_stage_input(input_path, "low-rank")
    model = lift_constants(loaded.model)
    data: SampleSet | StreamedSamples | None = None
    if config.calibration_data is not None:
        data = open_data(config.calibration_data, input_specs(model), equal_shapes=True)  # read as deep as used
    check, calibration = QualityCheck.measure(model, config, data, max_fit=config.calibration_samples,
                                              progress=progress)
    fit = held = None
    if calibration is not None:
        names, _ = layer_candidates(model, config)
        nodes = [n for n in ir.from_proto(model).graph if n.inputs and n.inputs[0] is not None
                 and n.inputs[0].name in names]
        if nodes:
            fit = _input_moments(model, nodes, calibration)
            if check.samples is not None:
                held = _input_moments(model, nodes, check.samples)
    tried: list[dict] = []
    decompositions: dict[str, tuple] = {}
    speed_gated = config.gate and config.objective is Objective.LATENCY

    def attempt(attempt_config: LowRankConfig) -> tuple[tuple, bool]:
        step(progress, f"try {len(tried) + 1}: factoring", message=f"energy {attempt_config.energy}"
             if attempt_config.rule is RankRule.ENERGY else f"rank ratio {attempt_config.ratio}")
        candidate, factored, skipped = factorize_model(model, attempt_config, fit=fit, held=held,
                                                       decompositions=decompositions)
        check.runs(candidate, "low-rank")
        value = check.score(candidate)
        within = check.passes(value, candidate)
        speed, slower = None, False
        if within and speed_gated and factored:
            speed, slower = check.slower(model, candidate)  # slower than the input: a miss, like quality
        tried.append(
            {"energy": attempt_config.energy, "ratio": attempt_config.ratio, "layers": len(factored), "score": value,
             "passes": within and not slower, "speedup": speed["speedup"] if speed else None, "slower": slower,
             "gate": check.verdict_note(candidate)}
        )
        return (candidate, factored, skipped, value, speed), (within and not slower) or not config.gate

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
    candidate, factored, skipped, value, speed = kept.outcome
    passed = kept.passed
    if not passed:
        candidate, factored, value, speed = model, {}, check.reference_score, None
    if speed is None and config.measure_latency and factored:
        speed = check.speedup(model, candidate)
    result = LowRankResult(
        path=out, factored_layers=factored, skipped_layers=skipped,
        params_before=count_parameters(model.graph, initializers_only=True),
        params_after=count_parameters(candidate.graph, initializers_only=True),
        latency_speedup={f"b{speed['batch']}": speed["speedup"]} if speed else {},
        score_before=check.reference_score, score_after=value, gate=check.describe(), tried=tried,
        quality=check.quality_note(), speed=speed, notes=loaded.notes,
    )
    save_model(candidate, out)
    if not passed:
        raise gate_missed(
            check, tried, tries="factorization", kept="input", out=out, result=result,
            remedies=_remedies(config),
            slower_hint="raise --min-params or --exclude the layers too small to gain, or pass --objective size to "
            "keep a smaller, slower model",
        )
    return result

