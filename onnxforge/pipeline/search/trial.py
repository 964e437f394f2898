"""One search trial, measured: build its chain through the registry and the stage cache, score the
result on the eval data against the input model, and time it interleaved with the input model on the
target.

Fitness is measured, never estimated: quality is the metric on held-out data; latency is the ratio
of the trial's p50 to the input model's p50 in the same interleaved run on the same machine (so a
ratio from one Ray node compares with a ratio from another; absolute times would not). Parameter and
MAC counts are recorded beside it and never used instead of it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge._atomic import atomic_path
from onnxforge.errors import CalibrationDataError, OnnxForgeError, QualityGateError
from onnxforge.model_cost import ComputeCost, compute_cost
from onnxforge.model_io import file_sha256, load_model, model_file_size
from onnxforge.pipeline import codec
from onnxforge.pipeline.cache import StageCache
from onnxforge.pipeline.codec import ABSENT, Absent
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import Metric, QualityGate
from onnxforge.pipeline.recipe import StageSpec
from onnxforge.pipeline.reference import Reference
from onnxforge.pipeline.registry import Artifact, Phase, StageContext, registered_passes
from onnxforge.pipeline.runner import StageArtifact, run_stage, stage_record
from onnxforge.pipeline.search.records import TrialRecord, TrialStage
from onnxforge.pipeline.search.space import TrialPlan
from onnxforge.pipeline.search.timing import cost_estimate, median_timing
from onnxforge.pipeline.user_metric import UserMetric
from onnxforge.targets import get_target

__all__ = [
    "TrialContext",
    "build_trial",
    "quality_loss",
    "reference_gate",
    "score_trial",
    "time_against_reference",
    "trial_reference",
    "trial_timer",
]


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, picklable (it travels to Ray workers): paths, not loaded data."""

    start_model: str  # the simplified input: every chain starts here
    start_sha256: str
    reference_model: str  # the input model: the quality reference and the latency baseline
    calibration: DataSpec
    eval_path: str
    target: str
    gate: QualityGate
    reference_score: float
    batch: int
    threads: int
    rounds: int
    cache_root: str | None
    source: str | None = None  # the framework model the input was exported from (what distill trains against)
    source_sha256: str | None = None
    repeats: int = 1  # interleaved timing calls per trial; the ratio is their median (search.timing)
    reference_bytes: int = 0  # the input model's size and compute: the baseline of a trial's cost estimate
    reference_cost: ComputeCost | None = None
    coarse_limit: int | None = None  # trials are scored on the first this many eval samples (None: all)

    def stage_context(self) -> StageContext:
        return StageContext(target=self.target, calibration=self.calibration,
                            eval_data=DataSpec(path=Path(self.eval_path)))


def quality_loss(gate: QualityGate, value: float, reference: float) -> float:
    """What the search minimizes for quality: accuracy points lost, points of disagreement, 1 - cosine,
    or the relative error itself."""
    if gate.metric is Metric.ACCURACY:
        return (reference - value) * 100.0
    if gate.metric in (Metric.AGREEMENT, Metric.POSITION_AGREEMENT):
        return (1.0 - value) * 100.0
    if gate.metric is Metric.USER:
        return reference - value
    if gate.metric in (Metric.COSINE, Metric.MIN_COSINE):
        return 1.0 - value
    return value


def stage_specs(plan: TrialPlan, context: StageContext) -> list[StageSpec]:
    """The plan's chain as stage specs: each pass's search defaults, then the trial's knob values."""
    registry = registered_passes()
    specs = []
    previous = "start"
    structured = False
    for index, (name, knobs) in enumerate(plan.stages, start=1):
        cls = registry[name]
        if Artifact.SOURCE in cls.consumes and not structured:
            continue  # distillation retrains what a structure pass removed: alone it has nothing to recover
        values = {**cls.search_defaults(context), **knobs}
        config = codec.decode(cls.config_cls, values, f"trial stage {name}")
        stage_name = f"{index:02d}_{name}"
        inputs = tuple("source" if a is Artifact.SOURCE else previous for a in cls.consumes)
        specs.append(StageSpec(name, config, stage_name, inputs))
        previous = stage_name
        structured = structured or cls.phase is Phase.STRUCTURE
    return specs


@dataclass
class BuiltTrial:
    path: Path  # the trial's final model (in ``work_dir``)
    stages: list[TrialStage]
    seconds: float


def build_trial(plan: TrialPlan, ctx: TrialContext, work_dir: Path) -> BuiltTrial:
    """Run the plan's chain from the start model into ``work_dir``, reusing cached stages."""
    start = time.perf_counter()
    context = ctx.stage_context()
    cache = StageCache(ctx.cache_root)
    artifacts = {"start": StageArtifact(ctx.start_model, ctx.start_sha256)}
    if ctx.source is not None:
        artifacts["source"] = StageArtifact(ctx.source, ctx.source_sha256 or "")
    records: list[TrialStage] = []
    current = Path(ctx.start_model)
    for spec in stage_specs(plan, context):
        output = work_dir / f"{spec.name}.onnx"
        try:
            record = run_stage(spec, [artifacts[i] for i in spec.inputs], output, context, cache)
        except QualityGateError as e:  # a stage's own gate: keep what it saved, the search scores it
            failed = stage_record(e)
            if not e.best_path or failed is None:
                raise
            record = failed
            artifacts[spec.name] = StageArtifact(e.best_path, file_sha256(e.best_path))
            records.append(TrialStage(kind=spec.kind, status=record.status, cache=record.cache,
                                      seconds=record.seconds, config=record.config))
            current = Path(e.best_path)
            continue
        artifacts[spec.name] = StageArtifact(str(output), record.output_file()["sha256"])
        result = record.result or {}
        records.append(TrialStage(kind=spec.kind, status=record.status, cache=record.cache, seconds=record.seconds,
                                  config=record.config, summary=record.summary,
                                  # a cached distill ran for this long when it was computed
                                  train_seconds=result.get("train_seconds", ABSENT)))
        current = output
    return BuiltTrial(current, records, time.perf_counter() - start)


_REFERENCES: dict[tuple, Reference] = {}


def trial_reference(ctx: TrialContext, limit: int | None = None) -> Reference:
    """The search's measurement service: the input model on the eval data (its first ``limit`` samples)
    on the target, with the search's gate; one per process and limit (its outputs are computed once, and
    shared through the evaluation cache with the gate optimize resolved: ``reference_gate``)."""
    key = (ctx.reference_model, ctx.eval_path, ctx.target, ctx.gate)
    if (key, None) not in _REFERENCES:
        _REFERENCES.clear()
        gate = ctx.gate
        _REFERENCES[key, None] = Reference(ctx.reference_model, Path(ctx.eval_path), ctx.target,
                                           metric=gate.user if gate.user is not None else gate.metric,
                                           tolerance=gate.tolerance, max_churn=gate.max_churn,
                                           worst_cosine=gate.worst_cosine, sequence_churn=gate.sequence_churn,
                                           eval_batch=32)
    if (key, limit) not in _REFERENCES:  # the coarse one: the full one's first samples and outputs
        _REFERENCES[key, limit] = _REFERENCES[key, None].head(limit or 0)
    return _REFERENCES[key, limit]


def score_trial(record: TrialRecord | dict[str, Any], model: Path, ctx: TrialContext, limit: int | None) -> None:
    """Score ``model`` on the first ``limit`` eval samples (None: all) into ``record`` (a TrialRecord, or
    its JSON data): ``quality``, ``loss`` and ``within_budget`` (every rule of the gate: ``Reference.passes``)
    against the input model on those same samples, and ``eval_samples``."""
    scorer = trial_reference(ctx, limit)
    value = scorer.score(model)
    reference = scorer.value if limit is not None else ctx.reference_score
    values = {"quality": value, "loss": quality_loss(ctx.gate, value, reference),
              "within_budget": bool(scorer.passes(value, model)), "eval_samples": len(scorer.samples)}
    for key, v in values.items():
        if isinstance(record, dict):
            record[key] = v
        else:
            setattr(record, key, v)


def reference_gate(reference: str, eval_path: DataSpec | Path, target: str, metric: Metric | UserMetric,
                   tolerance: float | None, *, max_churn: float | None = None, worst_cosine: float | None = None,
                   ) -> tuple[QualityGate, float, int]:
    """The search's gate (its rules None: their defaults), resolved on ``reference``'s outputs on the eval
    data, its score there, and how many samples the eval data holds.

    An accuracy budget on data without labels is a CalibrationDataError."""
    data = eval_path if isinstance(eval_path, DataSpec) else Path(eval_path)
    measured = Reference(reference, data, target, metric=metric, tolerance=tolerance, max_churn=max_churn,
                         worst_cosine=worst_cosine, eval_batch=32)
    if metric is Metric.ACCURACY and measured.samples.class_ids is None:
        raise CalibrationDataError(
            f"{getattr(eval_path, 'path', eval_path)}: no 'label' array of class ids; an accuracy budget "
            "(--max-drop) needs them",
            hint="add a 'label' array to the eval data, or use --metric agreement / cosine",
        )
    return measured.gate, measured.value, len(measured.samples)


def latency_feeds(ctx: TrialContext) -> dict[str, np.ndarray]:
    return trial_reference(ctx).feeds(ctx.batch)


def time_against_reference(models: Mapping[str, bytes | str], reference: bytes | str, ctx: TrialContext,
                           feeds: dict[str, np.ndarray], rounds: int | None = None) -> dict[str, dict[str, float]]:
    """Time ``models`` interleaved with the reference on this machine (Reference.time_against); p50s
    and ratios to the reference's p50 in the same run."""
    timer = trial_reference(ctx) if reference == ctx.reference_model else Reference(reference, None, ctx.target)
    timed = timer.time_against(models, rounds=rounds or ctx.rounds, threads=ctx.threads, feeds=feeds)
    return {name: timing.to_json() for name, timing in timed.items()}


def trial_timer(ctx: TrialContext, reference: bytes | str | None = None):
    """``timer(models, rounds)``: one interleaved call timing ``models`` against ``reference`` (default: the
    input model), as ``search.timing`` repeats it."""
    def timer(models: Mapping[str, bytes | str], rounds: int) -> dict[str, dict[str, float]]:
        return time_against_reference(models, reference if reference is not None else ctx.reference_model, ctx,
                                      latency_feeds(ctx), rounds=rounds)

    return timer


def evaluate_plan(number: int, plan: TrialPlan, ctx: TrialContext, keep: Path, *,
                  timing: bool = True) -> dict[str, Any]:
    """Build, score and (with ``timing``) time one trial; the final model is copied to ``keep``.

    A trial that fails (a pass that cannot handle the graph, a scheme the target rejects) is returned
    with ``status: failed`` and the reason: one trial never stops the search.
    """
    started = time.perf_counter()
    record = TrialRecord(number=number, plan=dict(plan.params), describe=plan.describe())
    work = Path(tempfile.mkdtemp(prefix="onnxforge-trial-"))
    try:
        built = build_trial(plan, ctx, work)
        record.stages = tuple(built.stages)
        trained = [st.train_seconds for st in built.stages if not isinstance(st.train_seconds, Absent)]
        record.distilled = bool(trained)  # which models were trained against the source, and for how long
        record.training_seconds = round(sum(trained), 3)
        score_trial(record, built.path, ctx, ctx.coarse_limit)
        record.bytes = model_file_size(built.path)
        record.sha256 = file_sha256(built.path)
        cost: ComputeCost | None = None
        try:
            from onnxforge.model_cost import count_parameters

            built_model = load_model(built.path)
            cost = compute_cost(built_model)
            record.params, record.macs_estimate = count_parameters(built_model.graph, initializers_only=True), cost.macs
        except Exception:  # an estimate beside the measurement, never a reason to fail a trial
            record.params = record.macs_estimate = None
        target = get_target(ctx.target)
        record.cost_estimate = cost_estimate(record.bytes, cost, ctx.reference_bytes, ctx.reference_cost,
                                             kernel_macs=target.kernel_overhead_macs,
                                             int8_speedup=target.int8_mac_speedup)
        if timing:
            trial = median_timing({"trial": str(built.path)}, trial_timer(ctx), ctx.rounds, ctx.repeats)["trial"]
            record.reference_ms, record.model_ms = trial["reference_ms"], trial["model_ms"]
            record.ratio = ratio = trial["ratio"]
            record.ratio_spread = trial["ratio_spread"]
            record.speedup = 1.0 / ratio
        keep.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(keep) as tmp:  # a symlink left at ``keep`` is replaced, never written through
            shutil.copyfile(built.path, tmp)
        record.path = str(keep)
    except OnnxForgeError as e:
        record.status, record.error = "failed", e.message
    except Exception as e:  # a bug in a pass on this graph: recorded with its type, the search goes on
        last = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(last.filename).name}:{last.lineno}"
        record.status, record.error = "failed", f"{type(e).__name__}: {str(e)[:200]} ({where})"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record.seconds = round(time.perf_counter() - started, 3)
    # The search loop (Optuna's user attributes, Ray, the front) takes the record as JSON data.
    return record.to_json()
