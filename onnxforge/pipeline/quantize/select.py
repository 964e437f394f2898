"""Measuring the candidate schemes against fp32 and choosing one.

Each candidate is quantized (backends) from its graph (graphs: the fused one for dynamic schemes
when there is one, else the base one; smoothed by smooth_quant for ``-smooth`` schemes, built once
per graph), with static schemes reading ranges calibrated once per graph and method, scored on the
held-out samples against the fp32 model's outputs (and labels) and sized; then fp32 and every
candidate are timed interleaved on the target.
The kept candidate is the fastest that meets the tolerance (objective size: the smallest), ties in
the timing noise going to the better score; it is kept only when it improves on the input
(improves(): faster than fp32 beyond the tie band, or smaller), else the caller keeps the input and
raises. When the fastest misses it, mixed
precision (mixed_precision) returns its most sensitive nodes to float until it holds, and everything
is timed again. When no candidate meets the tolerance the most accurate one is kept (the caller
raises). The kept model's per-node error (local and end-to-end SQNR vs fp32, quant_error) is
measured on calibration samples.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from onnxforge.errors import CalibrationDataError, QualityGateError
from onnxforge.pipeline.calibration import SampleSet, model_batch_size
from onnxforge.pipeline.evaluate import Metric, QualityGate
from onnxforge.pipeline.normalize import quantized_ops
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.quantize.attention_mask import mask_nodes
from onnxforge.pipeline.quantize.backends import error_line, quantizable_op_types, quantize_candidate
from onnxforge.pipeline.quantize.calibrate import CalibrationData, collect
from onnxforge.pipeline.quantize.coarse_scoring import coarse_count, refine
from onnxforge.pipeline.quantize.config import CalibrationMethod, CandidateResult, Objective, QuantizeConfig, Ranges
from onnxforge.pipeline.quantize.graphs import Graphs
from onnxforge.pipeline.quantize.mixed_precision import (
    MixedPrecisionSearch,
    node_groups,
    rank_nodes,
    search_float_nodes,
    share_in_float,
)
from onnxforge.pipeline.quantize.op_classes import OpClassReport, measure_classes, time_shares
from onnxforge.pipeline.quantize.opset import failing_op
from onnxforge.pipeline.quantize.quant_error import NodeError, measure_node_errors
from onnxforge.pipeline.quantize.schemes import DYNAMIC_OP_TYPES, qdq_twin
from onnxforge.pipeline.quantize.smooth_quant import smooth_model
from onnxforge.pipeline.quantize.timing_record import recorded_timings, timing_key
from onnxforge.pipeline.reference import Reference
from onnxforge.targets import QuantFormat, QuantMethod, QuantScheme, QuantScope
from onnxforge.targets.latency import LatencyStats
from onnxforge.targets.op_profile import OpProfile, OpProfileConfig, profile_ops

if TYPE_CHECKING:  # the cache imports the registry, which imports this stage
    from onnxforge.pipeline.cache import StageCache

__all__ = ["REWRITTEN_FP32", "CandidateRun"]

REWRITTEN_FP32 = "fp32 graph quantized from"  # timed beside fp32 when the candidates' graph was rewritten

_log = logging.getLogger(__name__)

# Determinism (issue 7, reliability): p50s move ~±15% run to run, and on small models the candidates
# are within a few percent of each other, so "the minimum p50" picked a different scheme on each run
# of the same recipe (3 runs, 3 choices, measured). Candidates within this fraction of the fastest
# count as tied; among them the better score wins (issue 23: ties go to quality, never to a timing
# difference inside the noise), then the earliest in the target's order (the list order). The input
# is in that race too: a candidate must be faster than fp32 beyond this band to be kept (improves).
_LATENCY_TIE_FRACTION = 0.05
# Time to result (issue 23): a candidate whose median is this much above the fastest of fp32 and the
# candidates that meet the tolerance can be neither kept nor beat the input, so after a few rounds
# (compare_latency's min_rounds) it stops being timed. 1.3 is twice the run-to-run noise of a p50.
_DROP_SLOWER = 1.3
_PROFILE_RUNS = 20  # per-op profile runs for a profiled scheme (medians per node)


def _by_quality(candidates: Sequence[CandidateResult], gate: QualityGate | None) -> CandidateResult:
    """The best-scoring of ``candidates`` (unscored last), the earliest among equals."""
    sign = 1.0 if gate is None or gate.higher_is_better else -1.0

    def rank(item: tuple[int, CandidateResult]) -> tuple[float, int]:
        index, c = item
        return (-sign * c.score if c.score is not None else float("inf"), index)

    return min(enumerate(candidates), key=rank)[1]


def _fastest(candidates: Sequence[CandidateResult], gate: QualityGate | None = None) -> CandidateResult:
    """The fastest of ``candidates`` (every one timed): those within _LATENCY_TIE_FRACTION of the
    minimum p50 are tied, and the tie goes to the better score under ``gate``, then to the earliest."""
    p50 = {id(c): c.latency.p50_ms for c in candidates if c.latency is not None}
    best = min(p50.values())
    return _by_quality([c for c in candidates if p50[id(c)] <= best * (1.0 + _LATENCY_TIE_FRACTION)], gate)


def _smallest(candidates: Sequence[CandidateResult], gate: QualityGate | None = None) -> CandidateResult:
    """The smallest of ``candidates`` (every one sized); equal sizes go to the better score, then the earliest."""
    sizes = {id(c): c.bytes for c in candidates if c.bytes is not None}
    best = min(sizes.values())
    return _by_quality([c for c in candidates if sizes[id(c)] == best], gate)


def _latency_feeds(held_out: SampleSet, batch: int) -> dict:
    return held_out.first_batch(batch)


class NothingFaster(ValueError):
    """A profiled scheme found no op type measured faster in int8 on the target: it has nothing to do."""


class CandidateRun:
    """The candidates of one quantize() call and the fp32 reference they are measured against.

    Constructing it runs the fp32 model on the held-out samples and resolves the quality gate;
    candidate models are written to ``folder``.
    """

    def __init__(self, folder: Path, graphs: Graphs, config: QuantizeConfig, target, data: CalibrationData) -> None:
        self.tmp = folder
        self.graphs = graphs
        self.fp32_path = graphs.fp32
        self.config = config
        self.target = target
        self.data = data
        self.held_out = data.held_out
        self.eval_batch = data.eval_batch()  # what fits the memory limit (memory_plan)
        # fp32 on the held-out samples: what every candidate is scored against and timed beside
        self.reference = Reference(graphs.fp32, self.held_out, target, metric=config.metric, tolerance=config.tolerance,
                                   max_churn=config.max_churn, worst_cosine=config.worst_cosine,
                                   eval_batch=self.eval_batch, threads=config.threads, low_memory=data.low_memory,
                                   specs=data.specs)
        self.gate = self.reference.gate
        if self.gate.metric is Metric.ACCURACY and self.held_out.class_ids is None:
            raise CalibrationDataError(
                f"{self.held_out.source}: accuracy needs a 'label' array of integer class ids",
                hint="or use --metric agreement; text labels are for a user metric (file.py:function)",
            )
        self.fp32_score = self.reference.value
        self.candidates: list[CandidateResult] = []
        self.paths: dict[str, Path] = {}  # candidate label -> its model
        self.scheme_of: dict[str, QuantScheme] = {}  # candidate label -> the scheme it was quantized with
        self.timings: dict[str, LatencyStats] = {}  # the latest interleaved timing, "fp32" included
        # where timings are recorded and found (timing_record); None: always time
        self.records: StageCache | None = None
        self.timings_reused = False  # whether the latest timing was recorded by an earlier run
        self.progress: Progress = ignore  # hears calibration, scoring and timing (onnxforge.pipeline.progress)
        self.notes: list[str] = []  # what building the graphs said (smoothing)
        self.calibration_batches = 0
        self._count = 0
        self._smoothed: dict[Path, Path] = {}
        self._ranges: dict[tuple[Path, CalibrationMethod], Ranges] = {}
        self._masks: dict[Path, list[str]] = {}
        self._op_classes: dict[Path, OpClassReport] = {}
        self.coarse: Reference | None = None  # the held-out subset candidates are ranked on (coarse_scoring)
        self.refined = 0
        self.op_classes: OpClassReport | None = None  # what a profiled scheme measured (op_classes)

    def source(self, scheme: QuantScheme) -> Path:
        """The fp32 graph ``scheme`` is quantized from (see the module doc)."""
        graph = self.graphs.fused if scheme.method is QuantMethod.DYNAMIC and self.graphs.fused else self.graphs.base
        return self._smooth(graph) if scheme.smooth else graph

    def _smooth(self, graph: Path) -> Path:
        if graph not in self._smoothed:
            batch = self.data.statistics_batch()
            if batch is None:
                raise CalibrationDataError(f"smoothing statistics: {self.data.refusal('statistics')}")
            batches = self.data.batches(self.config.calibration_samples, batch)
            result = smooth_model(onnx.load(str(graph)), batches(), self.config.smooth_alpha)
            path = graph.with_name(graph.stem + "_smooth.onnx")
            onnx.save_model(result.model, str(path))
            self._smoothed[graph] = path
            if not self.notes or result.note not in self.notes:
                self.notes.append(result.note)
        return self._smoothed[graph]

    def ranges(self, graph: Path, scheme: QuantScheme) -> Ranges:
        """Activation ranges of ``graph`` for ``scheme`` (percentile, or the config's method), calibrated once."""
        method = CalibrationMethod.PERCENTILE if scheme.percentile else self.config.calibration_method
        key = (graph, method)
        if key not in self._ranges:
            cache = graph.with_name(f"{graph.stem}_ranges_{method.value}.json")
            self._ranges[key], batches = collect(graph, method, self.data, self.config, cache, self.progress)
            self.calibration_batches = self.calibration_batches or batches
        return self._ranges[key]

    def quantize(self, scheme: QuantScheme, float_nodes: Sequence[str] = (), source: Path | None = None,
                 op_types: Sequence[str] | None = None) -> Path:
        """``scheme`` applied to ``source`` (default: its graph), ``float_nodes`` kept in float; a profiled
        scheme quantizes the op types measured faster in int8 (op_classes), or ``op_types`` when given."""
        self._count += 1
        dest = self.tmp / f"candidate_{self._count}.onnx"
        source = source or self.source(scheme)
        static = scheme.method is QuantMethod.STATIC
        if static and source not in self._masks:
            self._masks[source] = mask_nodes(onnx.load(str(source), load_external_data=False))
        profiled = static and scheme.scope is QuantScope.PROFILED and op_types is None
        extra: list[str] = []
        if profiled:
            op_types, extra = self._classes(scheme, source).selection()
        quantize_candidate(source, dest, scheme, self.config, self.ranges(source, scheme) if static else None,
                           [*float_nodes, *extra], self._masks.get(source, ()), op_types)
        if profiled and not quantized_ops(onnx.load(str(dest), load_external_data=False).graph):
            # the types measured faster have no int8 kernel (a Flatten): this "candidate" is the input, and
            # a timing of the input against itself must never be taken for a gain
            raise NothingFaster(f"the op types measured faster in int8 ({', '.join(op_types or ())}) have nothing "
                                "onnxruntime quantizes: it would be the input model")
        if profiled and not float_nodes and self.op_classes is not None and not self.op_classes.after:
            self.op_classes.after = time_shares(self._profile(dest))
        return dest

    def _profile(self, path: Path) -> OpProfile:
        """``path`` profiled per op on the target, on the timing feeds."""
        feeds = _latency_feeds(self.held_out, model_batch_size(self.data.specs, preferred=1))
        return profile_ops(path, feeds, OpProfileConfig(target=self.target, threads=self.config.threads,
                                                        warmup=3, runs=_PROFILE_RUNS))

    def _classes(self, scheme: QuantScheme, source: Path) -> OpClassReport:
        """Which op types run faster in int8 on the target, measured once per graph (op_classes);
        NothingFaster when none does (the profiled candidate does not apply: it is left out, not failed)."""
        if source not in self._op_classes:
            whole = dataclasses.replace(scheme, scope=QuantScope.ALL)
            feeds = _latency_feeds(self.held_out, model_batch_size(self.data.specs, preferred=1))

            def time_models(models: Mapping[str, Path]) -> dict[str, float]:
                timed = Reference(source, None, self.target).time_against(
                    models, rounds=max(5, self.config.latency_rounds // 2), threads=self.config.threads, feeds=feeds)
                return {label: t.speedup for label, t in timed.items()}

            report = measure_classes(
                scheme.label, self._profile(source), onnx.load(str(source), load_external_data=False),
                quantizable_op_types(source, self.config.exclude_op_types),
                lambda ops, floats: self.quantize(whole, floats, source=source, op_types=ops), time_models)
            self._op_classes[source] = report
            self.op_classes = report
            self.notes.append(f"{scheme.label}: {report.describe()}")
        report = self._op_classes[source]
        if not report.quantized:
            raise NothingFaster(f"no op type runs faster in int8 than in float on {self.target.name}")
        return report

    def score(self, path: Path) -> float:
        """``path``'s score against fp32 on the held-out samples (Reference.score)."""
        return self.reference.score(path)

    def agreement(self, path: Path, scorer: Reference | None = None) -> float | None:
        """With labels, ``path``'s top-1 agreement with fp32's predictions on ``scorer``'s samples (default:
        all held-out ones; the churn an accuracy drop can hide: the same accuracy with other samples wrong);
        None without labels (the metric says it)."""
        if self.gate.metric is not Metric.ACCURACY:
            return None
        return (scorer or self.reference).agreement(path)

    def measure(self, schemes: Sequence[QuantScheme]) -> None:
        """Quantize and score every scheme, then time them all; raises QualityGateError when every one failed."""
        failing_ops: list[str] = []
        count = coarse_count(len(self.held_out)) if self.config.objective is Objective.LATENCY else None
        self.coarse = self.reference.head(count) if count is not None else None
        for index, scheme in enumerate(schemes):
            step(self.progress, "quantizing and scoring candidates", index, len(schemes), scheme.label)
            result = CandidateResult(scheme.label)
            self.candidates.append(result)
            start = time.perf_counter()
            try:
                dest = self.quantize(scheme)
                if self.config.float_share > 0:
                    dest = self._share_in_float(scheme, dest, result)
                result.score = self.coarse.score(dest) if self.coarse else self.score(dest)
            except NothingFaster as e:  # a profiled scheme with nothing to quantize here: not a candidate
                self.candidates.remove(result)
                self.notes.append(f"{scheme.label} left out: {e}")
                continue
            except Exception as e:  # one failing scheme must not sink the others
                result.error = error_line(e)
                failing_ops.append(failing_op(str(e)) or "")
                continue
            _log.debug("quantized %s in %.1fs", scheme.label, time.perf_counter() - start)
            if self.coarse is not None:  # ranked on a subset first (coarse_scoring); every rule of the gate
                result.meets_tolerance = self.coarse.passes(result.score, dest)
                result.gate_checks = self.coarse.verdict(dest).message()
                result.agreement_with_input = self.agreement(dest, self.coarse)  # on all samples if refined
                result.scored_samples = count
            else:
                result.meets_tolerance = self.reference.passes(result.score, dest)
                result.gate_checks = self.reference.verdict(dest).message()
                result.agreement_with_input = self.agreement(dest)
            result.bytes = dest.stat().st_size
            self.paths[result.scheme] = dest
            self.scheme_of[result.scheme] = scheme
        step(self.progress, "quantizing and scoring candidates", len(schemes), len(schemes))
        if not self.candidates:  # every scheme was a profiled one with nothing measured faster
            raise QualityGateError(f"no op type runs faster in int8 than in float on {self.target.name}: "
                                   "nothing to quantize", hint="keep the fp32 model, or name another --scheme")
        if not self.paths:
            ops = [op for op in dict.fromkeys(failing_ops) if op]
            own = [op for op in ops if op in ("QuantizeLinear", "DequantizeLinear")]
            if own:
                hint = (f"the quantizer's own {own[0]} is what fails: try another scheme (--scheme "
                        "qdq-u8s8-per-tensor or qoperator-u8s8-per-channel)")
            elif ops:
                hint = f"the failing op is {ops[0]}: keep it in float with --exclude-op {ops[0]}"
            else:
                hint = "keep the op in the error in float with --exclude-op OP_TYPE, or try another --scheme"
            raise QualityGateError(
                "every quantization scheme failed: " + "; ".join(f"{c.scheme}: {c.error}" for c in self.candidates),
                hint=hint,
            )
        self.time_all()

    def time_all(self) -> None:
        """Time fp32 and every candidate interleaved on the target (Reference.time_against: one call, fp32's
        own timing in it the baseline); sets each candidate's latency and speedup. A candidate clearly
        slower than fp32 and every passing candidate stops early (``_DROP_SLOWER``). The timings of the same
        models recorded in ``records`` (the stage cache) are reused (timing_record)."""
        models = {"fp32": self.fp32_path} | dict(self.paths)
        if self.graphs.rewritten:
            models[REWRITTEN_FP32] = self.graphs.base
        feeds = _latency_feeds(self.held_out, model_batch_size(self.data.specs, preferred=1))

        def measure() -> dict[str, LatencyStats]:
            candidates = {label: path for label, path in models.items() if label != "fp32"}
            timed = self.reference.time_against(
                candidates,
                rounds=self.config.latency_rounds,
                threads=self.config.threads,
                feeds=feeds,
                reference_name="fp32",
                drop_slower_than=_DROP_SLOWER,
                rivals=[c.scheme for c in self.candidates if c.meets_tolerance and c.scheme in models],
                progress=self.progress,
                phase=f"timing fp32 and {len(candidates)} candidate(s) interleaved",
            )
            return {label: timed[label].stats for label in models}

        key = timing_key(
            models, feeds, target=self.target.name, threads=self.config.threads, rounds=self.config.latency_rounds
        )
        timings, reused = recorded_timings(self.records, key, list(models), measure)
        self.timings_reused = reused
        for c in self.candidates:
            if c.scheme in timings:
                c.latency = timings[c.scheme]
                c.speedup = timings["fp32"].p50_ms / c.latency.p50_ms
        self.timings = timings
        if self.coarse is not None:
            self.refined += refine(self.candidates, self._score_all, _LATENCY_TIE_FRACTION)

    def _score_all(self, candidate: CandidateResult) -> tuple[float, bool]:
        """``candidate`` scored on every held-out sample (coarse_scoring.refine), its agreement beside."""
        path = self.paths[candidate.scheme]
        value = self.score(path)
        candidate.agreement_with_input = self.agreement(path)
        candidate.gate_checks = self.reference.verdict(path).message()
        return value, self.reference.passes(value, path)

    def coarse_note(self) -> str | None:
        """What the coarse ranking did, for the result's notes."""
        if self.coarse is None:
            return None
        return (f"candidates ranked on the first {len(self.coarse.samples)} of {len(self.held_out)} held-out "
                f"samples; {self.refined} that could be kept were scored on all of them (scored_samples marks "
                "the others)")

    def mixed_precision(self, notes: list[str]) -> MixedPrecisionSearch | None:
        """When the fastest candidate misses the tolerance, add its mixed-precision version as a candidate.

        Mixed precision starts from the fastest candidate. When dynamic int8 missed the gate too it
        gets its own search (its MatMuls back to float, ranked on its static QDQ twin), and the
        timing decides between the two: on MiniLM static QDQ needed ~70 nodes in float (1.1x fp32)
        while dynamic missed the worst sentence by a few thousandths. Returns the last search run.
        """
        gate, config = self.gate, self.config
        search: MixedPrecisionSearch | None = None
        timed = [c for c in self.candidates if c.latency is not None]
        fastest = _fastest(timed, gate)
        to_search = [fastest] if config.mixed_precision and not fastest.meets_tolerance else []
        if to_search:
            to_search += [
                c
                for c in timed
                if c is not fastest and not c.meets_tolerance and self.scheme_of[c.scheme].method is QuantMethod.DYNAMIC
            ][:1]
        for base in to_search:
            if self.scheme_of[base.scheme].method is QuantMethod.FP16:
                notes.append(f"mixed precision skipped on {base.scheme}: fp16 has no per-node int8 to undo")
                continue
            size = self.data.analysis_size()  # ranking the nodes measures every quantized node's output
            if size is None:
                notes.append(f"mixed precision skipped on {base.scheme}: {self.data.refusal('analysis')}")
                continue
            found = None
            try:
                found, step_paths = self._search_float_nodes(self.scheme_of[base.scheme], self.paths[base.scheme], size,
                                                             base.float_nodes)
            except Exception as e:  # the analysis is an improvement, not a requirement
                notes.append(f"mixed precision could not run on {base.scheme}: {error_line(e)}")
            if found is None:
                continue
            search = found
            scored = gate.best([(s, s.score) for s in search.steps if s.score is not None], lambda pair: pair[1])
            step = search.best or (scored[0] if scored else None)
            if step is None or step.score is None:  # a passing step (best) is a scored one
                notes.append(f"mixed precision on {base.scheme}: no step could be scored")
                continue
            label = f"{base.scheme} + {len(step.float_nodes)} float node(s)"
            mixed = CandidateResult(label, score=step.score, meets_tolerance=step.meets_tolerance)
            mixed.float_nodes = [*base.float_nodes, *step.float_nodes]  # float_share's nodes stay float too
            path = step_paths.get(step.float_nodes)
            if path is not None:
                mixed.bytes = path.stat().st_size
                mixed.agreement_with_input = self.agreement(path)
                mixed.gate_checks = self.reference.verdict(path).message()
                self.candidates.append(mixed)
                self.paths[label] = path
                self.scheme_of[label] = self.scheme_of[base.scheme]
                self.time_all()
            notes.append(
                f"mixed precision on {base.scheme}: {len(step.float_nodes)} node(s) back to float "
                f"({', '.join(step.float_nodes[:6])}{', ...' if len(step.float_nodes) > 6 else ''}), "
                f"{gate.format(base.score) if base.score is not None else 'no score'} -> {gate.format(step.score)}"
                + ("" if step.meets_tolerance else ": still over tolerance")
            )
        return search

    def _node_errors(self, source: Path, qdq_path: Path, size: tuple[int, int], *, graph_outputs: bool = False
                     ) -> list[NodeError]:
        """measure_node_errors on calibration samples at ``size``: (batch, passes over the nodes)."""
        batch, passes = size
        return measure_node_errors(
            source,
            qdq_path,
            self.data.batches(self.config.analysis_samples, batch),
            passes=passes,
            output_sizes=self.data.tensor_sizes(source) if passes > 1 else None,
            graph_outputs=graph_outputs,
        )

    def _ranking(self, scheme: QuantScheme, path: Path, size: tuple[int, int]
                 ) -> tuple[list[NodeError], dict[str, tuple[str, ...]]]:
        """``scheme``'s quantized nodes, worst local SQNR first (on calibration samples), and the nodes each
        must bring back to float with it (mixed_precision.node_groups)."""
        static = scheme.method is QuantMethod.STATIC
        source = self.source(scheme)
        qdq_path = (
            path if static and scheme.format is QuantFormat.QDQ else self.quantize(qdq_twin(scheme), source=source)
        )
        step(self.progress, "mixed precision: ranking the quantized nodes", message=scheme.label)
        errors = self._node_errors(source, qdq_path, size)
        errors = [e for e in errors if e.node not in self.config.exclude_nodes]
        if static:
            groups = node_groups(onnx.load(str(qdq_path), load_external_data=False), [e.node for e in errors])
        else:  # dynamic: only its integer MatMuls can go back to float, each on its own
            errors = [e for e in errors if e.op_type in DYNAMIC_OP_TYPES]
            groups = {e.node: (e.node,) for e in errors}
        return rank_nodes(errors), groups

    def _share_in_float(self, scheme: QuantScheme, path: Path, result: CandidateResult) -> Path:
        """``scheme`` quantized again with ``config.float_share`` of its quantized nodes in float, the most
        sensitive first (share_in_float); ``path`` itself when the scheme has no int8 nodes to undo or the
        per-node analysis does not fit (a note says which). Relabels ``result`` with the float nodes."""
        if scheme.method not in (QuantMethod.STATIC, QuantMethod.DYNAMIC):
            self.notes.append(f"float_share skipped on {scheme.label}: {scheme.method.value} has no per-node int8 "
                              "to undo")
            return path
        size = self.data.analysis_size()  # ranking the nodes measures every quantized node's output
        if size is None:
            self.notes.append(f"float_share skipped on {scheme.label}: {self.data.refusal('analysis')}")
            return path
        ranking, groups = self._ranking(scheme, path, size)
        nodes = share_in_float(ranking, groups, self.config.float_share)
        if not nodes:
            return path
        result.scheme = f"{scheme.label} + {len(nodes)} float node(s)"
        result.float_nodes = list(nodes)
        return self.quantize(scheme, nodes)

    def _search_float_nodes(
        self, scheme: QuantScheme, path: Path, size: tuple[int, int], already: Sequence[str] = ()
    ) -> tuple[MixedPrecisionSearch, dict[tuple[str, ...], Path]]:
        """Rank ``scheme``'s quantized nodes by local SQNR on calibration samples; search float nodes."""
        ranking, groups = self._ranking(scheme, path, size)
        step_paths: dict[tuple[str, ...], Path] = {}

        def evaluate(float_nodes: tuple[str, ...]) -> tuple[float, bool]:
            step(self.progress, "mixed precision: steps scored", len(step_paths),
                 message=f"{len(float_nodes)} node(s) in float")  # a bisection: no total known in advance
            dest = self.quantize(scheme, (*already, *float_nodes))  # ``path`` has ``already`` in float
            step_paths[float_nodes] = dest
            value = self.score(dest)
            return value, self.reference.passes(value, dest)

        search = search_float_nodes(
            scheme.label,
            ranking,
            groups,
            evaluate,
            max_float_fraction=self.config.max_float_fraction,
            max_steps=self.config.mixed_precision_steps,
        )
        return search, step_paths

    def choose(self) -> tuple[CandidateResult, bool]:
        """(the best candidate, whether it meets the tolerance): the fastest passing one (objective
        latency; ties within ``_LATENCY_TIE_FRACTION`` to the better score, then the earliest) or the
        smallest (objective size); else the most accurate one. Whether it beats the input: improves()."""
        passing = [c for c in self.candidates if c.meets_tolerance and c.latency is not None]
        if passing and self.config.objective is Objective.SIZE:
            sized = [c for c in passing if c.bytes is not None]
            if sized:
                return _smallest(sized, self.gate), True
        if passing:
            return _fastest(passing, self.gate), True
        measured = [(c, c.score) for c in self.candidates if c.score is not None and c.scheme in self.paths]
        best = self.gate.best(measured, lambda pair: pair[1])
        if best is None:  # never: measure() raised QualityGateError when no candidate could be scored
            raise QualityGateError("no quantized candidate could be scored")
        return best[0], False

    def improves(self, chosen: CandidateResult, input_bytes: int) -> bool:
        """Whether ``chosen`` (a passing candidate) beats the input on the objective. latency: fp32 is a
        candidate of the same race, with the best quality, so the fastest passing candidate must be faster
        than fp32's own timing in the same interleaved run beyond the tie band; size: smaller than the
        input's ``input_bytes``."""
        if self.config.objective is Objective.SIZE:
            return chosen.bytes is not None and chosen.bytes < input_bytes
        timed = [c.latency.p50_ms for c in self.candidates if c.meets_tolerance and c.latency is not None]
        return bool(timed) and min(timed) * (1.0 + _LATENCY_TIE_FRACTION) < self.timings["fp32"].p50_ms

    def layer_errors(self, chosen: CandidateResult, notes: list[str]) -> list[NodeError]:
        """Per-node error of the kept model (of its QDQ twin when it is QOperator) on calibration samples,
        its graph outputs' end-to-end error after the nodes'."""
        if not self.config.error_report:
            return []
        scheme = self.scheme_of[chosen.scheme]
        if scheme.method is not QuantMethod.STATIC:
            notes.append(f"per-layer error report skipped: {chosen.scheme} has no QDQ nodes to measure")
            return []
        try:
            path = self.paths[chosen.scheme]
            source = self.source(scheme)
            qdq_path = (
                path
                if scheme.format is QuantFormat.QDQ
                else self.quantize(qdq_twin(scheme), chosen.float_nodes, source=source)
            )
            size = self.data.analysis_size()
            if size is None:
                notes.append(f"per-layer error report skipped: {self.data.refusal('analysis')}")
                return []
            return self._node_errors(source, qdq_path, size, graph_outputs=True)
        except Exception as e:
            notes.append(f"per-layer error report failed: {error_line(e)}")
            return []
