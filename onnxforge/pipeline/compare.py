"""Layer-wise comparison of two models on the same inputs: where do they first diverge?

Both models run with every intermediate tensor marked as a graph output (onnx-ir), one sample at
a time. Model A's float tensors are taken in graph order and matched to model B's by name, else by
the producing node's name and output index (a quantizer that renames tensors keeps node names);
the graph outputs are always compared, by position. For each matched pair, accumulated over all
samples:

- SQNR = 10 log10(sum a^2 / sum (a - b)^2) in dB (higher is better; identical tensors: infinite);
- cosine = sum(a b) / sqrt(sum a^2 sum b^2) over the flattened tensors;
- max |a - b|, and the relative error ||a - b|| / ||a||.

The *first divergence* is the first tensor in A's graph order whose SQNR falls below the threshold
(20 dB: a relative error above 10%). Marking every tensor as an output keeps onnxruntime from fusing
across them, so the kernels run are the unfused ones (as with Polygraphy's ``--onnx-outputs mark all``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.pipeline import codec
from onnxforge.pipeline.progress import Progress, counted, ignore

__all__ = [
    "CompareResult",
    "ErrorAccumulator",
    "TensorError",
    "compare_models",
    "compare_report_html",
    "with_outputs",
]

DEFAULT_THRESHOLD_DB = 20.0
_CHUNK = 1 << 20  # elements summed at once (8 MB per float64 temporary)


class ErrorAccumulator:
    """Running sums for SQNR, cosine, relative and max-abs error between a reference and a value."""

    __slots__ = ("dot", "max_abs", "noise", "signal", "value_energy")

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.value_energy = 0.0
        self.max_abs = 0.0

    def add(self, reference: np.ndarray, value: np.ndarray) -> None:
        reference, value = np.asarray(reference), np.asarray(value)
        if reference.shape == value.shape and reference.size > _CHUNK:
            # in float64 a whole tensor's sums took 8x its float32 size in temporaries (600 MB for one
            # 16x480x640 map at batch 4): summed a chunk at a time, they take a chunk's
            ref, val = reference.reshape(-1), value.reshape(-1)
            for start in range(0, ref.size, _CHUNK):
                self._add(ref[start : start + _CHUNK], val[start : start + _CHUNK])
            return
        self._add(reference, value)

    def _add(self, reference: np.ndarray, value: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        val = np.asarray(value, dtype=np.float64)
        diff = ref - val
        self.signal += float(np.square(ref).sum())
        self.noise += float(np.square(diff).sum())
        self.dot += float((ref * val).sum())
        self.value_energy += float(np.square(val).sum())
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))

    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.signal, 1e-30) / self.noise)

    def relative_error(self) -> float:
        return math.sqrt(self.noise / self.signal) if self.signal > 0 else (0.0 if self.noise == 0 else math.inf)

    def cosine(self) -> float:
        if self.signal == 0.0 and self.value_energy == 0.0:
            return 1.0
        if self.signal == 0.0 or self.value_energy == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.signal * self.value_energy)


def _finite(value: float) -> float | None:
    # JSON has no Infinity: an error-free tensor is reported as null.
    return round(value, 3) if math.isfinite(value) else None


@dataclass(frozen=True)
class TensorError(codec.JsonResult):
    """One matched tensor pair: A's name, B's name, A's producing node, how they were matched, errors."""

    name: str
    name_b: str
    node: str
    op_type: str
    matched_by: str  # "name", "producer" or "output"
    sqnr_db: float = field(metadata={"encode": _finite})
    cosine: float
    max_abs: float
    relative_error: float = field(metadata={"encode": _finite})


@dataclass
class CompareResult:
    model_a: Path
    model_b: Path
    samples: int
    threshold_db: float
    tensors: list[TensorError]  # matched intermediate tensors, A's graph order
    outputs: list[TensorError]  # graph outputs, by position
    first_divergence: TensorError | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        worst = min(self.outputs, key=lambda t: t.sqnr_db, default=None)
        out = f"outputs SQNR {worst.sqnr_db:.1f} dB, cosine {worst.cosine:.5f}" if worst else "no output compared"
        where = (f"first below {self.threshold_db:g} dB at {self.first_divergence.name} "
                 f"({self.first_divergence.op_type} {self.first_divergence.node})"
                 if self.first_divergence else f"no tensor below {self.threshold_db:g} dB")
        return f"{len(self.tensors)} tensors matched; {out}; {where}"

    def to_json(self) -> dict:
        return {
            "model_a": str(self.model_a),
            "model_b": str(self.model_b),
            "samples": self.samples,
            "threshold_db": self.threshold_db,
            "summary": self.summary(),
            "first_divergence": self.first_divergence.to_json() if self.first_divergence else None,
            "outputs": [t.to_json() for t in self.outputs],
            "tensors": [t.to_json() for t in self.tensors],
            "notes": self.notes,
        }


def with_outputs(model: onnx.ModelProto, names: Iterable[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (None: every node output), in graph order."""
    copy = ir.from_proto(model)
    graph = copy.graph
    wanted = None if names is None else set(names)
    present = {v.name for v in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if value.name and value.name not in present and (wanted is None or value.name in wanted):
                graph.outputs.append(value)
                present.add(value.name)
    return ir.to_proto(copy)


@dataclass(frozen=True)
class _Pair:
    name: str
    name_b: str
    node: str
    op_type: str
    matched_by: str


def _match(a: onnx.ModelProto, b: onnx.ModelProto) -> tuple[list[_Pair], list[_Pair]]:
    """(intermediate pairs in A's graph order, graph-output pairs by position)."""
    outputs_a = [o.name for o in a.graph.output]
    outputs_b = [o.name for o in b.graph.output]
    produced_b = {o for n in b.graph.node for o in n.output if o}
    by_node_b = {n.name: list(n.output) for n in b.graph.node if n.name}
    pairs = []
    for node in a.graph.node:
        for index, name in enumerate(node.output):
            if not name or name in outputs_a:
                continue
            if name in produced_b:
                pairs.append(_Pair(name, name, node.name, node.op_type, "name"))
            elif node.name in by_node_b and index < len(by_node_b[node.name]) and by_node_b[node.name][index]:
                pairs.append(_Pair(name, by_node_b[node.name][index], node.name, node.op_type, "producer"))
    producers_a = {o: n for n in a.graph.node for o in n.output}
    outputs = []
    for name_a, name_b in zip(outputs_a, outputs_b, strict=False):
        node = producers_a.get(name_a)
        outputs.append(_Pair(name_a, name_b, node.name if node else "", node.op_type if node else "", "output"))
    return pairs, outputs


def compare_models(
    model_a: str | os.PathLike,
    model_b: str | os.PathLike,
    data: object,
    *,
    target: str = "cpu",
    target_b: str | None = None,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
    max_samples: int = 16,
    progress: Progress = ignore,
) -> CompareResult:
    """Run ``model_a`` and ``model_b`` (on ``target``; B on ``target_b`` when given) on up to
    ``max_samples`` samples of ``data`` (an .npz, a folder, or anything onnxforge's calibration
    readers take) and report each matched tensor's error, B against A (see the module doc); each
    sample is reported to ``progress``."""
    from onnxforge.errors import InvalidModelError, UsageError
    from onnxforge.model_io import input_specs, load_model
    from onnxforge.pipeline.calibration import open_calibration
    from onnxforge.targets import get_target

    if max_samples < 1:
        raise UsageError("max_samples must be at least 1")
    a, b = load_model(model_a), load_model(model_b)
    specs = input_specs(a)
    names_b = {s.name for s in input_specs(b)}
    missing = [s.name for s in specs if s.name not in names_b]
    if missing:
        raise InvalidModelError(f"{model_b}: has no input {missing[0]!r}, which {model_a} takes; cannot feed both")
    source = open_calibration(data, specs, limit=max_samples)
    samples = source.take(slice(0, min(max_samples, len(source))))
    pairs, outputs = _match(a, b)
    notes = []
    if not pairs:
        notes.append("no intermediate tensor of A matches one of B by name or producing node: compared the "
                     "graph outputs only")
    session_a = get_target(target).session(with_outputs(a).SerializeToString(), threads=1)
    session_b = get_target(target_b or target).session(with_outputs(b).SerializeToString(), threads=1)
    names_a = [o.name for o in session_a.get_outputs()]
    names_b_out = [o.name for o in session_b.get_outputs()]
    acc = {p.name: ErrorAccumulator() for p in [*pairs, *outputs]}
    skipped: dict[str, str] = {}
    count = 0
    for feeds in counted(progress, "running both models sample by sample", samples.batches(1), len(samples)):
        run_a = dict(zip(names_a, session_a.run(None, {k: feeds[k] for k in (s.name for s in specs)}), strict=True))
        feeds_b = {i.name: feeds[i.name] for i in session_b.get_inputs()}
        run_b = dict(zip(names_b_out, session_b.run(None, feeds_b), strict=True))
        count += 1
        for pair in [*pairs, *outputs]:
            if pair.name in skipped:
                continue
            x, y = run_a.get(pair.name), run_b.get(pair.name_b)
            reason = _comparable(x, y)
            if reason or x is None or y is None:  # _comparable said "missing" for None
                skipped[pair.name] = reason or "missing"
                continue
            acc[pair.name].add(x, y)
    kept = [p for p in pairs if p.name not in skipped]
    kept_outputs = [p for p in outputs if p.name not in skipped]
    shapes = sum(1 for p in pairs if skipped.get(p.name) == "shape")
    if shapes:
        notes.append(f"{shapes} matched tensor(s) differ in shape between the models (a layout or fusion change): "
                     "skipped")
    for p in outputs:
        if p.name in skipped:
            notes.append(f"output {p.name!r}: not compared ({skipped[p.name]})")
    tensors = [_error(p, acc[p.name]) for p in kept]
    output_errors = [_error(p, acc[p.name]) for p in kept_outputs]
    first = next((t for t in [*tensors, *output_errors] if t.sqnr_db < threshold_db), None)
    return CompareResult(Path(model_a), Path(model_b), count, threshold_db, tensors, output_errors, first, notes)


def _comparable(x: np.ndarray | None, y: np.ndarray | None) -> str | None:
    if x is None or y is None:
        return "missing"
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind != "f" or y.dtype.kind != "f":
        return "not float"
    if x.shape != y.shape:
        return "shape"
    return None


def _error(pair: _Pair, acc: ErrorAccumulator) -> TensorError:
    return TensorError(pair.name, pair.name_b, pair.node, pair.op_type, pair.matched_by, acc.sqnr_db(),
                       acc.cosine(), acc.max_abs, acc.relative_error())


def compare_report_html(result: CompareResult, *, bars: int = 60) -> str:
    """A self-contained page: SQNR per tensor in graph order (a chart and a table), the first divergence."""
    from onnxforge.report import _page, _table
    from onnxforge.report_charts import _esc, bar_chart_svg

    def db(t: TensorError) -> str:
        return "identical" if not math.isfinite(t.sqnr_db) else f"{t.sqnr_db:.1f}"

    rows = [*result.tensors, *result.outputs]
    finite = [t for t in rows if math.isfinite(t.sqnr_db)]
    cap = max((t.sqnr_db for t in finite), default=100.0)
    step = max(1, math.ceil(len(rows) / bars))
    charted = rows[::step]
    chart_items = [(f"{t.name} ({t.op_type})", t.sqnr_db if math.isfinite(t.sqnr_db) else cap) for t in charted]
    chart_texts = [f"{db(t)} dB" if math.isfinite(t.sqnr_db) else "identical" for t in charted]
    first = result.first_divergence
    body = [
        f"<h1>compare {_esc(result.model_a.name)} vs {_esc(result.model_b.name)}</h1>",
        f"<p>{_esc(result.summary())}; {result.samples} sample(s).</p>",
        f"<p><b>First divergence</b> (SQNR below {result.threshold_db:g} dB): "
        + (f"{_esc(first.name)} from {_esc(first.op_type)} node {_esc(first.node)}, {db(first)} dB"
           if first else "none")
        + "</p>",
        *[f"<p class=\"meta\">{_esc(n)}</p>" for n in result.notes],
        bar_chart_svg(chart_items, title=f"SQNR per tensor, graph order{f' (every {step}th)' if step > 1 else ''}",
                      unit=" dB", width=760, label_width=300, texts=chart_texts),
        "<h2>Tensors</h2>",
        _table(("tensor", "op", "node", "matched by", "SQNR dB", "cosine", "max abs", "rel. error"),
               [(_esc(t.name), _esc(t.op_type), _esc(t.node), t.matched_by, db(t), f"{t.cosine:.6f}",
                 f"{t.max_abs:.3g}", f"{t.relative_error:.3g}") for t in rows], left=4),
    ]
    return _page(f"compare {result.model_a.name} vs {result.model_b.name}", body)

