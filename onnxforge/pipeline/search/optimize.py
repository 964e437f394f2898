"""``onnxforge optimize``: the fastest (or smallest) model for the target within an accuracy budget.

1. The input (an .onnx, or a framework source exported first) is simplified once: every trial
   starts from that model, and the *input* model is the reference for quality and latency.
2. An Optuna study (multi-objective: quality loss and latency ratio, or file size) proposes chains
   of passes from the registry's knobs; it is seeded with the single-stage baselines. Each trial is
   built through the stage cache (so a prune shared by several quantization schemes is computed
   once), scored on the eval data and timed interleaved with the input model on the target.
3. The study lives in ``RUN_DIR/study.log``: running ``optimize`` on the same folder continues it,
   and trials interrupted mid-way are run again.
4. The Pareto front is re-timed together, interleaved, so its speedups are consistent with each
   other; front models go to ``RUN_DIR/front/`` with a recipe each that rebuilds them, the chosen
   one to ``RUN_DIR/best.onnx``, plus ``pareto.json``, ``manifest.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onnxforge._atomic import atomic_write_text
from onnxforge.errors import QualityGateError, UsageError
from onnxforge.model_io import file_sha256
from onnxforge.pipeline import codec
from onnxforge.pipeline.cache import StageCache, stage_key
from onnxforge.pipeline.evaluate import QualityGate
from onnxforge.pipeline.manifest import machine_description, tool_versions
from onnxforge.pipeline.recipe import StageSpec
from onnxforge.pipeline.registry import StageContext
from onnxforge.pipeline.runner import StageArtifact, run_stage, source_fingerprint
from onnxforge.pipeline.search.config import Objective, OptimizeConfig, Strategy
from onnxforge.pipeline.search.pareto import pareto_front
from onnxforge.pipeline.search.space import SearchSpace
from onnxforge.pipeline.search.trial import (
    TrialContext,
    evaluate_plan,
    latency_feeds,
    reference_gate,
    stage_specs,
    time_against_reference,
)
from onnxforge.targets import get_target

__all__ = ["OptimizeResult", "optimize"]

Progress = Callable[[dict[str, Any]], None]
STUDY_FILE = "study.log"
SETTINGS_FILE = "search.json"


@dataclass
class OptimizeResult:
    run_dir: Path
    metric: str
    gate: str
    reference_score: float
    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_path: Path | None
    wall_seconds: float
    executor: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "onnxforge-pareto/1",
            "run_dir": str(self.run_dir),
            "metric": self.metric,
            "gate": self.gate,
            "reference_score": self.reference_score,
            "executor": self.executor,
            "wall_seconds": round(self.wall_seconds, 2),
            "best": self.best,
            "best_path": str(self.best_path) if self.best_path else None,
            "front": self.front,
            "trials": self.trials,
            "notes": self.notes,
        }


def _prepare(model: str, run_dir: Path, config: OptimizeConfig, cache: StageCache, progress: Callable[[str], None]):
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
        progress(f"simplify failed ({e}); trials start from the input model")
        start = reference
    return reference, start


def _reference_gate(reference: str, config: OptimizeConfig) -> tuple[QualityGate, float]:
    return reference_gate(reference, config.eval_data.path, config.target, config.metric, config.tolerance)


def _settings(model_sha: str, config: OptimizeConfig, space: SearchSpace) -> dict[str, Any]:
    """What a run folder's study was started with; resuming with other settings is refused."""
    fingerprint = codec.fingerprint(config)
    for volatile in ("trials", "time_budget_s", "min_speedup"):  # a larger budget continues the same study
        fingerprint.pop(volatile, None)
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
    atomic_write_text(settings_path, json.dumps(settings, indent=1, default=str) + "\n")
    storage = JournalStorage(JournalFileBackend(str(study_path)))
    fresh = not study_path.exists() or not optuna.study.get_all_study_names(storage)
    study = optuna.create_study(study_name="onnxforge", storage=storage, sampler=_sampler(config),
                                directions=["minimize", "minimize"], load_if_exists=True)
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


def _objectives(record: dict[str, Any], config: OptimizeConfig) -> tuple[float, float]:
    cost = record["bytes"] if config.objective is Objective.SIZE else record["ratio"]
    return float(record["loss"]), float(cost)


def _finished(study) -> list[dict[str, Any]]:
    import optuna

    records = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) and "record" in t.user_attrs:
            records.append(t.user_attrs["record"])
    return sorted(records, key=lambda r: r["number"])


def optimize(
    model: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: OptimizeConfig,
    *,
    progress: Progress | None = None,
    cache: StageCache | None = None,
) -> OptimizeResult:
    """Search for the best model within ``config``'s budget; see the module docstring."""
    import optuna

    started = time.perf_counter()
    report = progress or (lambda event: None)
    say = lambda message: report({"message": message})  # noqa: E731
    cache = cache if cache is not None else StageCache.default()
    model = str(model)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{run_dir}: exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    get_target(config.target).require()
    has_source = not model.endswith(".onnx")
    space = SearchSpace(config.target, config.passes, config.space, has_source=has_source)
    say("preparing the input model")
    reference, start = _prepare(model, run_dir, config, cache, say)
    gate, reference_score = _reference_gate(reference.ref, config)
    ctx = TrialContext(
        start_model=start.ref, start_sha256=start.sha256, reference_model=reference.ref,
        calibration=config.calibration, eval_path=str(config.eval_data.path), target=config.target, gate=gate,
        reference_score=reference_score, batch=config.batch, threads=config.threads, rounds=config.latency_rounds,
        cache_root=str(cache.root) if cache.root else None,
        source=model if has_source else None, source_sha256=source_fingerprint(model) if has_source else None,
    )
    notes: list[str] = []
    study = _open_study(run_dir, config, space, _settings(reference.sha256, config, space), notes)
    trials_dir = run_dir / "trials"
    pool = None
    if config.ray_address:
        from onnxforge.pipeline.search.ray_pool import RayPool

        pool = RayPool(config.ray_address, ctx)
        notes.append(pool.describe())
    executor = pool.describe() if pool else "local: one trial at a time"
    deadline = None if config.time_budget_s is None else started + config.time_budget_s

    def complete() -> int:
        return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
                   for t in study.get_trials(deepcopy=False))

    def goal_met() -> bool:
        return config.min_speedup is not None and any(
            r["status"] == "ok" and r["within_budget"] and r.get("speedup", 0) >= config.min_speedup
            for r in _finished(study))

    def tell(trial, record: dict[str, Any]) -> None:
        trial.set_user_attr("record", record)
        if record["status"] == "ok":
            study.tell(trial, _objectives(record, config))
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        report({"trial": record, "done": complete(), "total": config.trials, "records": _finished(study),
                "deadline": deadline})

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
                say(f"trial {trial.number}: {plan.describe()}")
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
                        keep.write_bytes(data)
                        record["path"] = str(keep)
                    tell(trial, record)
        records = _finished(study)
        return _publish(run_dir, model, config, space, ctx, gate, reference_score, records, pool, started,
                        executor, notes, say)
    finally:
        if pool is not None:
            pool.close()


def _front(records: list[dict[str, Any]], config: OptimizeConfig) -> list[dict[str, Any]]:
    ok = [r for r in records if r["status"] == "ok" and r.get("path") and Path(r["path"]).exists()]
    seen: dict[str, dict[str, Any]] = {}
    for r in ok:  # the same model reached twice counts once
        seen.setdefault(r["sha256"], r)
    unique = list(seen.values())
    points = [_objectives(r, config) for r in unique]
    return [unique[i] for i in pareto_front(points)]


def _recipe_for(model: str, record: dict[str, Any], config: OptimizeConfig, space: SearchSpace) -> dict[str, Any]:
    """A recipe that rebuilds a front model with ``onnxforge run``."""
    stages: list[Any] = [] if model.endswith(".onnx") else ["export"]
    stages.append("simplify" if not stages else {"simplify": {"sample_data": codec.encode(config.eval_data)}})
    context = StageContext(target=config.target, calibration=config.calibration)
    for spec in stage_specs(space.plan_from_params(record["plan"]), context):
        stages.append({spec.kind: codec.encode(spec.config)})
    recipe = {"name": f"trial-{record['number']}",
              "model": str(Path(model).resolve()) if not model.startswith("builtin:") else model,
              "calibration": codec.encode(config.calibration), "eval": str(config.eval_data.path),
              "target": config.target, "stages": stages}
    if not model.endswith(".onnx"):
        recipe["dynamic_batch"] = config.dynamic_batch
        if config.input_shapes:
            recipe["input_shapes"] = codec.encode(config.input_shapes)
    return recipe


RETIME_EXTRA = 6  # besides the front, the fastest within-budget trials are re-timed too


def _retimed_front(records, config, ctx, pool, say) -> list[dict[str, Any]]:
    """The front after re-timing it together with the fastest within-budget trials, interleaved in one
    run: single trial timings on a busy machine can be off by tens of percent, and a front drawn from
    them would not be consistent with itself."""
    front = _front(records, config)
    if not front or config.objective is not Objective.LATENCY:
        return front
    usable = {r["sha256"]: r for r in reversed(records)
              if r["status"] == "ok" and r.get("path") and Path(r["path"]).exists()}
    fastest = sorted((r for r in usable.values() if r["within_budget"]), key=lambda r: r["ratio"])[:RETIME_EXTRA]
    candidates = {r["sha256"]: r for r in [*front, *fastest]}
    say(f"re-timing {len(candidates)} models (the front and the fastest within budget) together, interleaved")
    models = {str(r["number"]): r["path"] for r in candidates.values()}
    rounds = max(ctx.rounds, 30)
    timed = pool.retime(models, rounds) if pool else time_against_reference(
        models, ctx.reference_model, ctx, latency_feeds(ctx), rounds=rounds)
    for r in candidates.values():
        t = timed[str(r["number"])]
        r["trial_ratio"] = r.get("trial_ratio", r.get("ratio"))
        r.update(ratio=t["ratio"], reference_ms=t["reference_ms"], model_ms=t["model_ms"], speedup=1.0 / t["ratio"])
    retimed = list(candidates.values())
    front = [retimed[i] for i in pareto_front([_objectives(r, config) for r in retimed])]
    return sorted(front, key=lambda r: r["ratio"])


def _publish(run_dir, model, config, space, ctx, gate, reference_score, records, pool, started, executor, notes, say):
    front = _retimed_front(records, config, ctx, pool, say)
    within = [r for r in front if r["within_budget"]]
    key = (lambda r: r["bytes"]) if config.objective is Objective.SIZE else (lambda r: r["ratio"])
    best = min(within, key=key) if within else None
    front_dir = run_dir / "front"
    if front_dir.exists():
        shutil.rmtree(front_dir)
    front_dir.mkdir()
    for rank, r in enumerate(front, start=1):
        target_path = front_dir / f"{rank:02d}_trial{r['number']}.onnx"
        shutil.copyfile(r["path"], target_path)
        recipe = _recipe_for(model, r, config, space)
        atomic_write_text(target_path.with_suffix(".recipe.yaml"), yaml.safe_dump(recipe, sort_keys=False))
        r["front_path"] = str(target_path.relative_to(run_dir))
        r["recipe"] = str(target_path.with_suffix(".recipe.yaml").relative_to(run_dir))
    best_path = None
    if best is not None:
        best_path = run_dir / "best.onnx"
        shutil.copyfile(best["path"], best_path)
        atomic_write_text(run_dir / "best.recipe.yaml",
                          yaml.safe_dump(_recipe_for(model, best, config, space), sort_keys=False))
    on_front = {r["number"]: r for r in front}
    for r in records:  # the table shows every trial, the front ones with their re-timed numbers
        if r["number"] in on_front:
            r.update(on_front[r["number"]])
        r["on_front"] = r["number"] in on_front
    result = OptimizeResult(run_dir, gate.metric.value, gate.describe(), reference_score, records,
                            [on_front[r["number"]] for r in front], best, best_path,
                            time.perf_counter() - started, executor, notes)
    if best is None:
        notes.append("no trial stayed within the budget: best.onnx was not written")
    payload = result.to_json()
    payload["config"] = codec.encode(config)
    payload["space"] = space.describe()
    payload["machine"] = machine_description()
    payload["tool_versions"] = tool_versions()
    payload["reference_model"] = ctx.reference_model
    atomic_write_text(run_dir / "pareto.json", json.dumps(payload, indent=1, default=str) + "\n")
    atomic_write_text(run_dir / "manifest.json", json.dumps({
        "format": "onnxforge-manifest/1", "kind": "optimize", "model": model, "config": codec.encode(config),
        "tool_versions": tool_versions(), "machine": machine_description(),
        "files": {"best": "best.onnx" if best_path else None, "pareto": "pareto.json", "report": "report.html",
                  "front": [r["front_path"] for r in front]},
    }, indent=1, default=str) + "\n")
    from onnxforge.optimize_report import optimize_report_html
    from onnxforge.report import write_report

    write_report(run_dir / "report.html", optimize_report_html(payload))
    for r in records:  # trial files not on the front are in the stage cache; keep the run folder small
        if not r.get("on_front") and r.get("path") and Path(r["path"]).exists():
            Path(r["path"]).unlink()
    if best is None:
        error = QualityGateError(
            f"no trial stayed within the budget ({gate.describe()}); the front is in {run_dir / 'pareto.json'}",
            hint="loosen the budget (--max-drop / --tolerance), or give more --trials")
        error.result = result  # the CLI still shows the trials
        raise error
    return result
