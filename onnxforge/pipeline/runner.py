"""The pipeline runner: runs a recipe's stages (a small DAG) through the pass registry, reuses finished
stages from the content-addressed cache, measures every stage, and writes the manifest and report.

Each stage reads its inputs (the previous stage's file by default, the recipe's model for
``source``) and writes ``NN_<stage>.onnx`` into the run folder. Its cache key covers the pass, its
whole config (data files by content), the sha256 of its inputs, the recipe-level data it reads, the
target, the tool versions and onnxforge's own code; a hit is verified by hash and copied into the
run folder (a file already there with the right hash is left alone). A change re-runs that stage,
and — because their inputs' hashes change — every stage downstream of it, and nothing else.
After the stages, all stage models are scored on the evaluation data (its first ``max_samples``
when the recipe sets it) and timed side by side (interleaved, batch 1) on the recipe's target, all
against the first row through one ``Reference`` (pipeline/reference.py); each stage's phrase quotes
its speed over its input from that same timing. Each timed row is also profiled per op type (a few
runs, kept in the cache), so the report can show where the time went before and after each stage.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from onnxforge.errors import OnnxForgeError, QualityGateError
from onnxforge.model_io import content_sha256, file_sha256, input_specs, load_model
from onnxforge.pipeline import codec
from onnxforge.pipeline.cache import StageCache, code_fingerprint, stage_key
from onnxforge.pipeline.manifest import Manifest, StageRecord, describe_file, tool_versions
from onnxforge.pipeline.progress import Progress, ProgressEvent, counted, for_stage, ignore, step
from onnxforge.pipeline.recipe import SOURCE, Recipe, StageSpec
from onnxforge.pipeline.reference import Reference
from onnxforge.pipeline.registry import StageContext, registered_passes
from onnxforge.pipeline.run_guard import check_run_paths, stage_output
from onnxforge.targets import get_target
from onnxforge.targets.feeds import generate_feeds

__all__ = ["RunResult", "StageArtifact", "attach_record", "model_artifact", "run_recipe", "run_stage",
           "source_fingerprint", "stage_inputs", "stage_record"]



@dataclass
class RunResult:
    run_dir: Path
    manifest: Manifest
    metric: str | None

    @property
    def stages(self) -> list[StageRecord]:
        return self.manifest.stages


@dataclass(frozen=True)
class StageArtifact:
    """A stage's input or output: what a pass is given (a path or a source spec) and its content hash."""

    ref: str
    sha256: str


def source_fingerprint(model: str) -> str:
    """A hash of what an export reads: the .py/.pt/.keras/.onnx file (for built-ins, the checkpoint; for a
    Hugging Face folder, every file in it)."""
    if model.startswith("builtin:"):
        from onnxforge.converters.digits_cnn import CHECKPOINT_PATH

        return model + ":" + file_sha256(CHECKPOINT_PATH)
    from onnxforge.converters.source import parse_source

    spec = parse_source(model)
    if spec.callable is None and spec.path.is_dir():
        return f"folder:{content_sha256(spec.path)}"
    return f"{spec.path.suffix}:{spec.callable or ''}:{file_sha256(spec.path)}"


def model_artifact(model: str) -> StageArtifact:
    """The recipe's model as a stage input: an .onnx file by its sha256, a framework source by what it reads."""
    if model.endswith(".onnx"):
        return StageArtifact(model, file_sha256(Path(model)))
    return StageArtifact(model, source_fingerprint(model))


def stage_inputs(spec: StageSpec, artifacts: dict[str, StageArtifact]) -> list[StageArtifact]:
    """A stage's inputs: earlier stages' outputs, the recipe's model, or .onnx files named in ``inputs:``."""
    return [artifacts[name] if name in artifacts else StageArtifact(name, file_sha256(Path(name)))
            for name in spec.inputs]


def attach_record(error: BaseException, record: StageRecord) -> None:
    """Send a failed stage's record out with its error as ``error.record`` (the API documents it), so a
    caller can log the stage before re-raising. OSError is not ours to declare an attribute on, so the
    record goes into the instance's ``__dict__``; ``stage_record`` reads it back, typed."""
    vars(error)["record"] = record


def stage_record(error: BaseException) -> StageRecord | None:
    """The record ``attach_record`` sent out with ``error``, if any."""
    record = vars(error).get("record")
    return record if isinstance(record, StageRecord) else None


def _key(spec: StageSpec, inputs: list[StageArtifact], context: StageContext) -> str:
    return stage_key({
        "pass": spec.kind,
        "config": codec.fingerprint(spec.config),
        "inputs": [a.sha256 for a in inputs],
        "reads": {item: codec.fingerprint(context.value(item)) for item in spec.pass_cls.reads},
        "target": context.target,
        "versions": tool_versions(),
        "code": code_fingerprint(),
    })


def run_stage(
    spec: StageSpec,
    inputs: list[StageArtifact],
    output: Path,
    context: StageContext,
    cache: StageCache,
    *,
    force: bool = False,
    relative_to: Path | None = None,
) -> StageRecord:
    """Run (or restore from ``cache``) one stage into ``output``; returns its record.

    A QualityGateError or other OnnxForgeError is raised with the record attached as ``error.record``
    (status ``quality-gate-failed`` / ``failed``), so callers can log it before re-raising.
    """
    pass_obj = spec.pass_cls()
    key = _key(spec, inputs, context)
    config_json = codec.encode(spec.config)
    base = dict(name=spec.name, kind=spec.kind, config=config_json, key=key, inputs=[a.ref for a in inputs])
    lookup = cache.lookup(key) if not force else None
    if lookup is not None and lookup.entry is not None:  # a hit
        entry = lookup.entry
        recorded = entry["files"]["model.onnx"]
        written = entry.get("written")
        when = f" (entry written {written})" if isinstance(written, str) else ""
        if output.exists() and file_sha256(output) == recorded:
            note = f"unchanged since the last run, re-using {output.name}; in the stage cache {cache.root}{when}"
        else:
            cache.restore(lookup, output)
            note = f"restored {output.name} from the stage cache {cache.root}{when}"
        context.progress(ProgressEvent(note, stage=spec.name))
        return StageRecord(**base, status="cached", seconds=0.0, output=describe_file(output, relative_to),
                           result=entry.get("result"), verified=entry.get("verified", True),
                           summary=spec.pass_cls.summary(entry.get("result") or {}), cache=note)
    cache_note = "forced" if force else (lookup.reason if lookup else "not cached")
    context.progress(ProgressEvent("running", stage=spec.name,
                                   message=cache_note if cache_note.startswith("cached entry") else ""))
    start = time.perf_counter()
    try:
        own = dataclasses.replace(context, progress=for_stage(context.progress, spec.name))
        result = pass_obj.run(spec.config, [a.ref for a in inputs], output, own)
    except QualityGateError as e:
        kept = Path(e.best_path) if e.best_path else None
        attach_record(e, StageRecord(**base, status="quality-gate-failed", seconds=time.perf_counter() - start,
                                     output=describe_file(kept, relative_to) if kept and kept.exists() else None,
                                     verified=False, error=e.message, cache=cache_note))
        raise
    except OnnxForgeError as e:
        attach_record(e, StageRecord(**base, status="failed", seconds=time.perf_counter() - start,
                                     error=e.message, cache=cache_note))
        raise
    except OSError as e:  # a full disk or a read-only folder inside a library: recorded, then exit 2 (cli.main)
        attach_record(e, StageRecord(**base, status="failed", seconds=time.perf_counter() - start, cache=cache_note,
                                     error=f"{e.strerror or type(e).__name__}"
                                     + (f": {e.filename}" if e.filename else "")))
        raise
    result_json = result.to_json()
    verified = pass_obj.verified(result)
    record = StageRecord(**base, status="done", seconds=time.perf_counter() - start,
                         output=describe_file(output, relative_to), result=result_json, verified=verified,
                         summary=spec.pass_cls.summary(result_json), cache=cache_note)
    cache.publish(key, output, {"kind": spec.kind, "result": result_json, "verified": verified})
    return record


def _measure(manifest: Manifest, recipe: Recipe, progress: Progress, cache: StageCache | None = None) -> str | None:
    """Score and time every stage output against the first row (the input model, else the first stage)
    through one Reference; fills each record's metrics. Returns the metric name.

    A stage's summary quotes its speed against its input from this same timing (the table's numbers),
    not the check the stage ran on itself, so the row and its note never disagree.
    """
    records = [r for r in [manifest.baseline, *manifest.stages] if r is not None and r.output is not None]
    if not records:
        return None
    paths = {r.name: manifest.run_dir / r.output_file()["path"] for r in records}
    first = records[0].name
    # without shapes in the recipe, an exported model is timed at the shapes it was traced with
    traced = (records[0].result or {}).get("traced_shapes") or {} if manifest.baseline is None else {}
    input_shapes = dict(recipe.input_shapes) or {name: tuple(shape) for name, shape in traced.items()}
    reference = Reference(paths[first], recipe.eval_data, recipe.target, limit=recipe.max_samples, eval_batch=64,
                          input_shapes=input_shapes)
    specs = reference.specs
    own = {r.name for r in records if _takes_other_inputs(r, specs)}
    metric_name = None
    if reference.measured:
        metric = reference.gate.metric
        metric_name = metric.value
        for r in counted(progress, "scoring every stage on the evaluation data", records, len(records)):
            if r.name in own or _measured_itself(r, metric.value):
                _own_measurement(r, metric.value)
            else:
                verdict = reference.verdict(paths[r.name])  # the score, with the gate's other rules' lines
                r.metrics[metric.value] = verdict.value
                if r.name != first:
                    r.metrics["gate_checks"] = verdict.message()
    own_feeds = _own_feeds(reference.target, paths, [r for r in records if r.name in own])
    timed = {r.name: paths[r.name] for r in records[1:] if r.name not in own or r.name in own_feeds}
    timings = reference.time_against(timed, rounds=30, batch=1, threads=1, own_feeds=own_feeds, reference_name=first,
                                     progress=progress,
                                     phase=f"timing every stage side by side on {recipe.target} (batch 1, 1 thread)")
    for r in records:
        r.metrics["bytes"] = r.output_file()["bytes"]
    stats = {name: t.stats for name, t in timings.items()}
    base = stats[first].p50_ms
    for r in records:
        if r.name not in stats:
            continue
        r.metrics["latency_p50_ms"] = stats[r.name].p50_ms
        r.metrics["latency"] = stats[r.name].to_json()
        r.metrics["speedup_vs_first"] = base / stats[r.name].p50_ms
    _speed_against_inputs(records, paths, stats)
    _op_times(reference, records, paths, own_feeds, cache, progress)
    return metric_name


def _op_times(reference: Reference, records: list[StageRecord], paths: dict[str, Path], own_feeds: dict,
              cache: StageCache | None, progress: Progress) -> None:
    """Each timed row's time per op type (``metrics["op_time"]``), for the report's before/after chart;
    a model the profiler cannot run gets a note, never a failed run."""
    timed = [r for r in records if "latency_p50_ms" in r.metrics]
    if not timed:
        return
    for index, r in enumerate(timed):
        step(progress, "profiling where each stage's time goes (per op type)", index, len(timed), r.name)
        try:
            r.metrics["op_time"] = reference.op_time(paths[r.name], feeds=own_feeds.get(r.name),
                                                     cache=cache).to_json()
        except Exception as e:  # an optional chart's data: a profiler failure never fails the run
            from onnxforge.pipeline.quantize.backends import error_line

            r.metrics["note"] = (r.metrics.get("note", "") + f"; not profiled: {error_line(e)}").lstrip("; ")


def _speed_against_inputs(records: list[StageRecord], paths: dict[str, Path], stats: dict) -> None:
    """Each timed stage's speed against its (timed) input, from the table's timing; its summary says it."""
    by_path = {os.path.realpath(p): name for name, p in paths.items()}
    for r in records:
        if r.name not in stats or not r.inputs or r.status not in ("done", "cached"):
            continue
        source = by_path.get(os.path.realpath(r.inputs[0]))
        if source is None or source not in stats or source == r.name:
            continue
        speedup = stats[source].p50_ms / stats[r.name].p50_ms
        r.metrics["speedup_vs_input"] = speedup
        pass_cls = registered_passes().get(r.kind)
        if pass_cls is not None and r.result is not None:
            r.summary = pass_cls.summary({**r.result, "measured_speedup": speedup})


# ----------------------------------------------------------------------------------------------
# Stages that measure themselves: a merged graph takes raw uint8 images or text where the eval .npz
# holds the network's floats, and gives a label where the runner reads class scores. Such a stage
# scores itself on the eval data (its result's "metrics"), which the runner takes as they are; a
# graph whose inputs differ from the eval data's is timed on random inputs of its own kind.


def _takes_other_inputs(record: StageRecord, specs) -> bool:
    theirs = {(i["name"], i["dtype"]) for i in record.output_file().get("inputs", [])}
    return bool(theirs) and theirs != {(s.name, str(s.dtype)) for s in specs}


def _measured_itself(record: StageRecord, metric: str) -> bool:
    return metric in ((record.result or {}).get("metrics") or {})


def _own_measurement(record: StageRecord, metric: str) -> None:
    if _measured_itself(record, metric):
        record.metrics[metric] = (record.result or {})["metrics"][metric]
        record.metrics["note"] = f"{metric} measured by the stage itself on the evaluation data"
    else:
        record.metrics["note"] = "its inputs differ from the evaluation data's: not scored"


def _own_feeds(target, paths: dict[str, Path], records: list[StageRecord]) -> dict:
    """{name: random feeds of the graph's own inputs}; a graph that cannot be run here (text inputs,
    a tokenizer's custom ops) gets a note instead, and is not timed."""
    feeds = {}
    for record in records:
        try:
            own_model = load_model(paths[record.name])
            feeds[record.name] = generate_feeds(input_specs(own_model), batch=1, model=own_model)
            target.session(paths[record.name])  # loads here: timed with the others
        except OnnxForgeError as e:
            record.metrics["note"] = (record.metrics.get("note", "") + f"; not timed: {e.message}").lstrip("; ")
    return feeds


def run_recipe(
    recipe: Recipe,
    run_dir: str | os.PathLike,
    *,
    force: bool = False,
    measure: bool = True,
    progress: Progress | None = None,
    cache: StageCache | None = None,
) -> RunResult:
    """Run every stage of ``recipe`` into ``run_dir``; see the module docstring.

    ``cache``: where finished stages are kept and found (default: the user cache directory);
    ``force`` recomputes every stage without looking in it.
    """
    progress = progress or ignore
    cache = cache if cache is not None else StageCache.default()
    run_dir = Path(run_dir)
    check_run_paths(recipe, run_dir)  # a stage output may not overwrite what the run reads
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir, recipe.to_json())
    manifest.write()
    get_target(recipe.target).require()
    context = dataclasses.replace(recipe.context(progress), cache=cache)

    artifacts = {SOURCE: model_artifact(recipe.model)}
    if recipe.model.endswith(".onnx"):
        # An .onnx recipe: the input model is the baseline every stage is scored and timed against.
        source = Path(recipe.model)
        manifest.baseline = StageRecord(name="input", kind="input", status="input", config={},
                                        key=artifacts[SOURCE].sha256, seconds=0.0,
                                        output=describe_file(source, run_dir), result={"path": str(source)})
    for index, spec in enumerate(recipe.stages, start=1):
        output = stage_output(run_dir, index, spec.name)
        try:
            record = run_stage(spec, stage_inputs(spec, artifacts), output, context, cache,
                               force=force, relative_to=run_dir)
        except (OnnxForgeError, OSError) as e:
            failed = stage_record(e)
            if failed is not None:
                manifest.stages.append(failed)
                manifest.write()
            raise
        manifest.stages.append(record)
        manifest.write()
        artifacts[spec.name] = StageArtifact(str(output), record.output_file()["sha256"])

    if recipe.tune_session and recipe.stages:
        from onnxforge.pipeline.command_run import tune_output

        last = stage_output(run_dir, len(recipe.stages), recipe.stages[-1].name)
        manifest.stages[-1] = tune_output(recipe, last, manifest.stages[-1], progress)
        manifest.write()
    metric = None
    if measure:
        metric = _measure(manifest, recipe, progress, cache)
        manifest.write()
    from onnxforge.run_report import write_run_report

    write_run_report(manifest.to_json(), run_dir)  # report.html beside manifest.json, built from it
    return RunResult(run_dir, manifest, metric)
