"""``onnxforge optimize``: the fastest (or smallest) model for the target within an accuracy budget.

1. The input (an .onnx, or a framework source exported first) is simplified once: every trial
   starts from that model, and the *input* model is the reference for quality and latency.
2. An Optuna study (multi-objective: quality loss and latency ratio, or file size) proposes chains
   of passes from the registry's knobs for this graph; it is seeded with the single-stage baselines.
   Each trial is built through the stage cache (so a prune shared by several quantization schemes is
   computed once), scored on the eval data and timed interleaved with the input model on the target
   (the median of several calls). The sampler is steered by quality and a deterministic cost estimate,
   so timing noise does not change the plans (``timing``); the front and the choice are timed.
3. The study lives in ``RUN_DIR/study.log``: running ``optimize`` on the same folder continues it,
   and trials interrupted mid-way are run again (they do not count against ``trials``). The log is
   checked before it is trusted (``study_file``): trial files are relative to the run folder and
   confined to ``RUN_DIR/trials``.
4. The Pareto front is re-timed together, interleaved, so its speedups are consistent with each
   other, and the two fastest within budget again with more rounds until they separate; front models
   go to ``RUN_DIR/front/`` with a recipe each that rebuilds them, the chosen one to ``RUN_DIR/best.onnx``,
   plus ``pareto.json``, ``manifest.json`` and ``report.html`` (``publish``).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from onnxforge._atomic import atomic_write_bytes, atomic_write_text
from onnxforge.errors import UsageError
from onnxforge.model_io import file_sha256, load_model
from onnxforge.pipeline import codec
from onnxforge.pipeline.cache import StageCache, stage_key
from onnxforge.pipeline.evaluate import QualityGate
from onnxforge.pipeline.progress import Progress, ProgressEvent, ignore
from onnxforge.pipeline.recipe import StageSpec
from onnxforge.pipeline.registry import StageContext
from onnxforge.pipeline.run_guard import check_search_paths
from onnxforge.pipeline.runner import StageArtifact, run_stage, source_fingerprint
from onnxforge.pipeline.search.config import OptimizeConfig, Strategy
from onnxforge.pipeline.search.publish import OptimizeResult, publish, steer_objectives
from onnxforge.pipeline.search.space import SearchSpace
from onnxforge.pipeline.search.study_file import TRIALS_DIR, check_journal, stored_path, trial_records
from onnxforge.pipeline.search.trial import (
    TrialContext,
    evaluate_plan,
    reference_gate,
)
from onnxforge.targets import get_target

__all__ = ["OptimizeResult", "optimize"]

STUDY_FILE = "study.log"
SETTINGS_FILE = "search.json"


def _prepare(model: str, run_dir: Path, config: OptimizeConfig, cache: StageCache, progress: Progress):
    """(reference model, start model): the input (exported first when it is a source) and its simplified form."""
    from onnxforge.converters.config import ExportConfig
    from onnxforge.pipeline.simplify import SimplifyConfig

    context = StageContext(target=config.target, calibration=config.calibration, progress=progress)
    if model.endswith(".onnx"):
        reference = StageArtifact(str(Path(model)), file_sha256(model))
    else:
        spec = StageSpec("export", ExportConfig(input_shapes=dict(config.input_shapes),
                                                dynamic_batch=config.dynamic_batch), "export", ("source",))
        output = run_dir / "input_export.onnx"
        record = run_stage(spec, [StageArtifact(model, source_fingerprint(model))], output, context, cache)
        reference = StageArtifact(str(output), record.output_file()["sha256"])
    simplify = StageSpec("simplify", SimplifyConfig(sample_data=config.eval_data), "simplify", ("reference",))
    output = run_dir / "input_simplified.onnx"
    try:
        record = run_stage(simplify, [reference], output, context, cache)
        start = StageArtifact(str(output), record.output_file()["sha256"])
    except Exception as e:  # simplification is an optimization, not a requirement
        progress(ProgressEvent(f"simplify failed ({e}); trials start from the input model"))
        start = reference
    return reference, start


def _reference_cost(reference: str) -> dict[str, Any]:
    """The input model's size and compute, the baseline of every trial's cost estimate (``timing``)."""
    from onnxforge.model_cost import ComputeCost, compute_cost
    from onnxforge.model_io import model_file_size

    try:
        cost: ComputeCost | None = compute_cost(load_model(reference))
    except Exception:  # an estimate: without MACs the size ratio alone steers
        cost = None
    return {"reference_bytes": model_file_size(reference), "reference_cost": cost}


def search_reads(config: OptimizeConfig) -> list[Path]:
    """The data files (or folders) a search reads besides its model."""
    specs = (config.calibration, config.eval_data)
    return [Path(spec.path) for spec in specs if spec is not None and spec.path is not None]


def _reference_gate(reference: str, config: OptimizeConfig) -> tuple[QualityGate, float, int]:
    return reference_gate(reference, config.eval_data.path, config.target, config.metric, config.tolerance,
                          max_churn=config.max_churn, worst_cosine=config.worst_cosine)


def _settings(model_sha: str, config: OptimizeConfig, space: SearchSpace) -> dict[str, Any]:
    """What a run folder's study was started with; resuming with other settings is refused."""
    fingerprint = codec.fingerprint(config)
    for volatile in ("trials", "time_budget_s", "min_speedup"):  # a larger budget continues the same study
        fingerprint.pop(volatile, None)
    for rule in ("max_churn", "worst_cosine"):  # left at their defaults: a folder from before they existed resumes
        if fingerprint.get(rule) is None:
            fingerprint.pop(rule, None)
    return {"model": model_sha, "config": fingerprint, "space": space.describe(),
            "key": stage_key({"model": model_sha, "config": fingerprint})}


def _sampler(config: OptimizeConfig):
    import optuna

    if config.strategy is Strategy.NSGA2:
        return optuna.samplers.NSGAIISampler(seed=config.seed, population_size=max(8, min(50, config.trials // 3)))
    if config.strategy is Strategy.TPE:
        return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=max(4, config.trials // 4),
                                          multivariate=True, group=True, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=config.seed)  # RANDOM, and GRID (all enqueued up front)


def _open_study(run_dir: Path, config: OptimizeConfig, space: SearchSpace, settings: dict[str, Any], notes: list[str]):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    settings_path = run_dir / SETTINGS_FILE
    study_path = run_dir / STUDY_FILE
    if study_path.exists():
        try:
            previous = json.loads(settings_path.read_text())
        except (OSError, ValueError):
            previous = None
        if not previous or previous.get("key") != settings["key"]:
            raise UsageError(f"{run_dir} holds a search with other settings (model, data, budget or space)",
                             hint="use another -o folder to start a new search, or the same settings to continue it")
        dropped = check_journal(study_path)
        if dropped:
            notes.append(dropped)
    atomic_write_text(settings_path, json.dumps(settings, indent=1, default=str) + "\n")
    storage = JournalStorage(JournalFileBackend(str(study_path)))
    names = optuna.study.get_all_study_names(storage) if study_path.exists() else []
    if names and names != ["onnxforge"]:
        raise UsageError(f"{study_path}: not a study written by onnxforge", hint="use another -o folder")
    fresh = not names
    if fresh:
        study = optuna.create_study(study_name="onnxforge", storage=storage, sampler=_sampler(config),
                                    directions=["minimize", "minimize"])
    else:  # loading writes nothing: a damaged record is refused with the file as it was
        study = optuna.load_study(study_name="onnxforge", storage=storage, sampler=_sampler(config))
        _finished(study, run_dir)
    if fresh:
        plans = space.grid() if config.strategy is Strategy.GRID else space.seeds()
        for plan in plans[: config.trials]:
            study.enqueue_trial(space.optuna_params(plan), skip_if_exists=True)
    else:
        stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        for trial in stale:  # interrupted: fail it and run the same plan again
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, skip_if_exists=False)
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
        notes.append(f"continued the search in {run_dir}: {done} completed trials reused"
                     + (f", {len(stale)} interrupted trials run again" if stale else ""))
    return study


def _finished(study, run_dir: Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The checked records of the finished trials (see ``study_file.trial_records``), by number."""
    import optuna

    records = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) and "record" in t.user_attrs:
            records.append(t.user_attrs["record"])
    checked = trial_records(records, run_dir, run_dir / STUDY_FILE, notes)
    return sorted(checked, key=lambda r: r["number"])


def _standing(number: int, record: dict[str, Any], records: list[dict[str, Any]], deadline: float | None) -> str:
    """What a finished trial adds to the progress line: its status, the best so far, the budget left."""
    ok = [r for r in records if r["status"] == "ok" and r["within_budget"] and r.get("speedup")]
    best = max(ok, key=lambda r: r["speedup"], default=None)
    text = f"trial {number} {record['status']}"
    if best is not None:
        text += f"; best so far {best['speedup']:.2f}x (trial {best['number']})"
    if deadline is not None:
        text += f"; {max(0.0, deadline - time.perf_counter()):.0f}s of the time budget left"
    return text


def optimize(
    model: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: OptimizeConfig,
    *,
    progress: Progress | None = None,
    cache: StageCache | None = None,
    notes: list[str] | None = None,
) -> OptimizeResult:
    """Search for the best model within ``config``'s budget; see the module docstring.

    ``notes``: lines the run's report, pareto.json and manifest carry (say, flags that overrode a recipe).
    """
    import optuna

    started = time.perf_counter()
    report = progress or ignore
    say = lambda message: report(ProgressEvent(message))  # noqa: E731
    cache = cache if cache is not None else StageCache.default()
    model = str(model)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: exists and is not a folder")
    check_search_paths(model, search_reads(config), run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    get_target(config.target).require()
    has_source = not model.endswith(".onnx")
    SearchSpace(config.target, config.passes, config.space, has_source=has_source)  # a bad space fails before any work
    say("preparing the input model")
    reference, start = _prepare(model, run_dir, config, cache, report)
    notes = list(notes or [])
    space = SearchSpace(config.target, config.passes, config.space, has_source=has_source, model=load_model(start.ref))
    if space.inapplicable:
        notes.append(f"not searched, nothing to act on in this model: {', '.join(space.inapplicable)}")
    gate, reference_score, eval_count = _reference_gate(reference.ref, config)
    coarse = config.coarse_samples if config.coarse_samples is not None and config.coarse_samples < eval_count else None
    ctx = TrialContext(
        start_model=start.ref, start_sha256=start.sha256, reference_model=reference.ref,
        calibration=config.calibration, eval_path=str(config.eval_data.path), target=config.target, gate=gate,
        reference_score=reference_score, batch=config.settings[0][0], threads=config.settings[0][1],
        rounds=config.latency_rounds,
        cache_root=str(cache.root) if cache.root else None,
        source=model if has_source else None, source_sha256=source_fingerprint(model) if has_source else None,
        repeats=config.timing_repeats, coarse_limit=coarse, **_reference_cost(reference.ref),
    )
    study = _open_study(run_dir, config, space, _settings(reference.sha256, config, space), notes)
    trials_dir = run_dir / TRIALS_DIR
    pool = None
    if config.ray_address:
        from onnxforge.pipeline.search.ray_pool import RayPool

        pool = RayPool(config.ray_address, ctx)
        notes.append(pool.describe())
    executor = pool.describe() if pool else "local: one trial at a time"
    deadline = None if config.time_budget_s is None else started + config.time_budget_s

    def complete() -> int:  # an interrupted trial (failed without a record) is run again, not counted
        return sum(t.state is optuna.trial.TrialState.COMPLETE
                   or (t.state is optuna.trial.TrialState.FAIL and "record" in t.user_attrs)
                   for t in study.get_trials(deepcopy=False))

    def goal_met() -> bool:
        return config.min_speedup is not None and any(
            r["status"] == "ok" and r["within_budget"] and r.get("speedup", 0) >= config.min_speedup
            for r in _finished(study, run_dir))

    def tell(trial, record: dict[str, Any]) -> None:
        if record.get("path"):
            record["path"] = stored_path(run_dir, Path(record["path"]))
        trial.set_user_attr("record", record)
        if record["status"] == "ok":
            study.tell(trial, steer_objectives(record, config))
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        report(ProgressEvent("trials", complete(), config.trials,
                             _standing(trial.number, record, _finished(study, run_dir), deadline)))

    def grid_done() -> bool:  # the grid strategy runs its enqueued plans, nothing sampled beyond them
        return config.strategy is Strategy.GRID and not study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.WAITING,))

    def out_of_budget() -> bool:
        return (complete() >= config.trials or (deadline is not None and time.perf_counter() > deadline)
                or goal_met() or grid_done())

    try:
        if pool is None:
            while not out_of_budget():
                trial = study.ask()
                plan = space.suggest(trial)
                report(ProgressEvent("trials", complete(), config.trials, f"trial {trial.number}: {plan.describe()}"))
                tell(trial, evaluate_plan(trial.number, plan, ctx, trials_dir / f"{trial.number:04d}.onnx"))
        else:
            in_flight: dict[Any, Any] = {}
            while True:
                while len(in_flight) < pool.parallelism and complete() + len(in_flight) < config.trials \
                        and not (deadline is not None and time.perf_counter() > deadline) and not goal_met() \
                        and not grid_done():
                    trial = study.ask()
                    plan = space.suggest(trial)
                    in_flight[pool.submit(trial.number, plan)] = trial
                if not in_flight:
                    break
                for handle in pool.wait_any(list(in_flight)):
                    trial = in_flight.pop(handle)
                    record, data = pool.result(handle)
                    if data is not None:
                        keep = trials_dir / f"{trial.number:04d}.onnx"
                        keep.parent.mkdir(parents=True, exist_ok=True)
                        atomic_write_bytes(keep, data)
                        record["path"] = str(keep)
                    tell(trial, record)
        records = _finished(study, run_dir, notes)
        return publish(run_dir, model, config, space, ctx, gate, reference_score, records, pool, started,
                        executor, notes, say)
    finally:
        if pool is not None:
            pool.close()

