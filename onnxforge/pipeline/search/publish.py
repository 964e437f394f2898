"""Publishing a search: the front re-timed together, its models and their recipes in ``RUN_DIR/front/``,
the chosen one as ``best.onnx``, ``pareto.json``, ``manifest.json`` and ``report.html``.

Only files the search wrote are replaced or removed: ``front/`` files named ``NN_trialN.*`` and the
trial files in ``RUN_DIR/trials`` (their records were checked by ``study_file``); anything else a user
put in the run folder stays.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onnxforge._atomic import atomic_path, atomic_write_text
from onnxforge.errors import QualityGateError
from onnxforge.pipeline import codec
from onnxforge.pipeline.manifest import machine_description, tool_versions
from onnxforge.pipeline.registry import StageContext
from onnxforge.pipeline.search.config import Objective, OptimizeConfig
from onnxforge.pipeline.search.pareto import pareto_front
from onnxforge.pipeline.search.space import SearchSpace
from onnxforge.pipeline.search.timing import separate, steer_ratio
from onnxforge.pipeline.search.trial import score_trial, stage_specs, trial_reference, trial_timer

__all__ = ["OptimizeResult", "objectives", "publish", "steer_objectives"]


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
    settings: list[dict[str, Any]] = field(default_factory=list)  # a front and a best per (batch, threads)

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
            "settings": self.settings,
            "notes": self.notes,
        }


def objectives(record: dict[str, Any], config: OptimizeConfig) -> tuple[float, float]:
    """(quality loss, cost) as measured: what the front is drawn from."""
    cost = record["bytes"] if config.objective is Objective.SIZE else record["ratio"]
    return float(record["loss"]), float(cost)


def steer_objectives(record: dict[str, Any], config: OptimizeConfig) -> tuple[float, float]:
    """(quality loss, cost) as the sampler is told them (``timing``): for latency, the trial's
    deterministic cost estimate, or with ``timing_resolution`` its ratio on that ladder."""
    loss, cost = objectives(record, config)
    if config.objective is Objective.LATENCY:
        if config.timing_resolution is None and record.get("cost_estimate") is not None:
            return loss, float(record["cost_estimate"])
        cost = steer_ratio(cost, config.timing_resolution or 0.0)
    return loss, cost


def _front(records: list[dict[str, Any]], config: OptimizeConfig, run_dir: Path) -> list[dict[str, Any]]:
    ok = [r for r in records if r["status"] == "ok" and r.get("path") and (run_dir / r["path"]).exists()]
    seen: dict[str, dict[str, Any]] = {}
    for r in ok:  # the same model reached twice counts once
        seen.setdefault(r["sha256"], r)
    unique = list(seen.values())
    points = [objectives(r, config) for r in unique]
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


_FRONT_FILE = re.compile(r"^\d{2}_trial\d+\.(onnx|recipe\.yaml)$")  # what _publish writes into front/
RETIME_EXTRA = 6  # besides the front, the fastest within-budget trials are re-timed too


def _retimed_front(records, config, ctx, pool, say, run_dir: Path,
                   notes: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The front after re-timing it together with the fastest within-budget trials, interleaved (the
    median of ``timing_repeats`` calls), the two fastest within budget again with more rounds until they
    separate (``timing.separate``): single trial timings on a busy machine can be off by tens of
    percent, and a front drawn from them would not be consistent with itself. Also the candidates it
    drew the front from (what ``_setting_fronts`` times at the other settings)."""
    front = _front(records, config, run_dir)
    if not front:
        return front, []
    usable = {r["sha256"]: r for r in reversed(records)
              if r["status"] == "ok" and r.get("path") and (run_dir / r["path"]).exists()}
    cost = "bytes" if config.objective is Objective.SIZE else "ratio"
    fastest = sorted((r for r in usable.values() if r["within_budget"]), key=lambda r: r[cost])[:RETIME_EXTRA]
    candidates = {r["sha256"]: r for r in [*front, *fastest]}
    _rescore(list(candidates.values()), ctx, run_dir, say)
    if config.objective is not Objective.LATENCY:
        rescored = list(candidates.values())
        return [rescored[i] for i in pareto_front([objectives(r, config) for r in rescored])], rescored
    say(f"re-timing {len(candidates)} models (the front and the fastest within budget) together, interleaved")
    retimed = list(candidates.values())
    for r in retimed:
        r["model"] = str(run_dir / r["path"])
    settled = separate(retimed, pool.retime if pool else trial_timer(ctx), max(ctx.rounds, 30), ctx.repeats)
    for r in retimed:
        del r["model"]
    if not settled["separated"]:
        first, second = settled["contenders"]
        notes.append(f"trials {first} and {second} are within timing noise of each other after "
                     f"{settled['rounds']} rounds" + (" (the re-timing's time budget ran out)" if settled.get("stopped")
                                                     else "") + "; the choice between them is not significant")
    front = [retimed[i] for i in pareto_front([objectives(r, config) for r in retimed])]
    return sorted(front, key=lambda r: r["ratio"]), retimed


def _setting_fronts(candidates, front, best, config, ctx, say, run_dir: Path, notes: list[str]) -> list[dict[str, Any]]:
    """One front and one best per (batch, threads) setting beyond the first (a model that wins at one
    thread may lose at two): the first setting's candidates re-timed at each, interleaved, until the two
    fastest within budget separate. Each best is written as ``best_b<batch>_t<threads>.onnx``."""
    settings = []
    for index, (batch, threads) in enumerate(config.settings):
        if index == 0:
            timed, setting_front, setting_best = candidates, front, best
        else:
            say(f"re-timing {len(candidates)} front candidates at batch {batch}, {threads} thread(s)")
            timed = [{**r, "model": str(run_dir / r["path"])} for r in candidates]
            setting_ctx = dataclasses.replace(ctx, batch=batch, threads=threads)
            settled = separate(timed, trial_timer(setting_ctx), max(ctx.rounds, 30), ctx.repeats)
            if not settled["separated"]:
                notes.append(f"batch {batch}, {threads} thread(s): trials {settled['contenders'][0]} and "
                             f"{settled['contenders'][1]} are within timing noise of each other")
            setting_front = sorted((timed[i] for i in pareto_front([objectives(r, config) for r in timed])),
                                   key=lambda r: r["ratio"])
            within = [r for r in setting_front if r["within_budget"]]
            setting_best = min(within, key=lambda r: r["ratio"]) if within else None
        best_file = None
        if setting_best is not None:
            best_file = f"best_b{batch}_t{threads}.onnx"
            _copy(run_dir / setting_best["path"], run_dir / best_file)
        settings.append({
            "batch": batch, "threads": threads, "best": setting_best["number"] if setting_best else None,
            "best_path": best_file,
            "front": [{k: r.get(k) for k in ("number", "describe", "quality", "within_budget", "ratio", "speedup",
                                               "reference_ms", "model_ms", "bytes")} for r in setting_front],
        })
    return settings


def _rescore(candidates: list[dict[str, Any]], ctx, run_dir: Path, say) -> None:
    """Coarse-then-fine: candidates scored on a subset of the eval data are scored again on all of it
    (the trial's subset score stays as ``coarse_quality``)."""
    everything = len(trial_reference(ctx).samples)
    coarse = [r for r in candidates if r.get("eval_samples", everything) < everything]
    if coarse:
        say(f"scoring {len(coarse)} front candidates on all {everything} eval samples")
    for r in coarse:
        r["coarse_quality"] = r["quality"]
        score_trial(r, run_dir / r["path"], ctx, None)


def _copy(source: Path, destination: Path) -> None:
    """Copy atomically: a symlink at ``destination`` is replaced, never written through."""
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)


def publish(run_dir, model, config, space, ctx, gate, reference_score, records, pool, started, executor, notes, say):
    front, candidates = _retimed_front(records, config, ctx, pool, say, run_dir, notes)
    within = [r for r in front if r["within_budget"]]
    key = (lambda r: r["bytes"]) if config.objective is Objective.SIZE else (lambda r: r["ratio"])
    best = min(within, key=key) if within else None
    settings = []
    if len(config.settings) > 1 and config.objective is Objective.LATENCY and front:
        settings = _setting_fronts(candidates, front, best, config, ctx, say, run_dir, notes)
    elif len(config.settings) > 1:
        notes.append("several batch/threads settings give one front each for the latency objective only")
    front_dir = run_dir / "front"
    front_dir.mkdir(exist_ok=True)
    for old in front_dir.iterdir():  # an earlier run's front; anything else in front/ is the user's
        if _FRONT_FILE.match(old.name) and old.is_file() and not old.is_symlink():
            old.unlink()
    for rank, r in enumerate(front, start=1):
        target_path = front_dir / f"{rank:02d}_trial{r['number']}.onnx"
        _copy(run_dir / r["path"], target_path)
        recipe = _recipe_for(model, r, config, space)
        atomic_write_text(target_path.with_suffix(".recipe.yaml"), yaml.safe_dump(recipe, sort_keys=False))
        r["front_path"] = str(target_path.relative_to(run_dir))
        r["recipe"] = str(target_path.with_suffix(".recipe.yaml").relative_to(run_dir))
    best_path = None
    if best is not None:
        best_path = run_dir / "best.onnx"
        _copy(run_dir / best["path"], best_path)
        atomic_write_text(run_dir / "best.recipe.yaml",
                          yaml.safe_dump(_recipe_for(model, best, config, space), sort_keys=False))
        if config.tune_session:
            from onnxforge.pipeline.session_tuning import tune_session_file

            say("timing session settings for best.onnx")
            tuning = tune_session_file(best_path, config.eval_data, config.target, threads=ctx.threads,
                                       input_shapes=config.input_shapes)
            notes.append(f"best.onnx session: {tuning.summary()}"
                         + (f"; written to {Path(tuning.written).name}" if tuning.written else ""))
    on_front = {r["number"]: r for r in front}
    for r in records:  # the table shows every trial, the front ones with their re-timed numbers
        if r["number"] in on_front:
            r.update(on_front[r["number"]])
        r["on_front"] = r["number"] in on_front
    result = OptimizeResult(run_dir, gate.metric.value, gate.describe(), reference_score, records,
                            [on_front[r["number"]] for r in front], best, best_path,
                            time.perf_counter() - started, executor, notes, settings)
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
        "tool_versions": tool_versions(), "machine": machine_description(), "notes": notes,
        "files": {"best": "best.onnx" if best_path else None, "pareto": "pareto.json", "report": "report.html",
                  "session": "best.session.json" if (run_dir / "best.session.json").is_file() else None,
                  "front": [r["front_path"] for r in front],
                  "settings": {f"batch {s['batch']}, threads {s['threads']}": s["best_path"] for s in settings}},
    }, indent=1, default=str) + "\n")
    from onnxforge.optimize_report import optimize_report_html
    from onnxforge.report import write_report

    write_report(run_dir / "report.html", optimize_report_html(payload))
    for r in records:  # trial files not on the front are in the stage cache; keep the run folder small
        if not r.get("on_front") and r.get("path") and (run_dir / r["path"]).exists():
            (run_dir / r["path"]).unlink()  # checked: a trial file inside RUN_DIR/trials
    if best is None:
        error = QualityGateError(
            f"no trial stayed within the budget ({gate.describe()}); the front is in {run_dir / 'pareto.json'}",
            hint="loosen the budget (--max-drop / --tolerance), or give more --trials")
        error.result = result  # the CLI still shows the trials
        raise error
    return result
