"""The pipeline runner: chains stages, caches finished ones, measures every stage, writes the manifest.

Each stage reads the previous stage's file and writes ``NN_<stage>.onnx`` into the run folder.
A stage is re-used when an earlier manifest in the same folder has the same key (sha256 of the
stage kind, its config, its input file's hash and the tool versions) and its output file still
has the recorded hash; a change re-runs that stage and every stage after it. After the stages,
all stage models are scored on the evaluation data and timed side by side (interleaved, batch 1).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxforge import converters
from onnxforge.errors import OnnxForgeError, QualityGateError
from onnxforge.model_io import content_sha256, file_sha256, input_specs, load_model
from onnxforge.pipeline.calibration import load_samples, model_batch_size
from onnxforge.pipeline.evaluate import Metric, resolve_metric, run_outputs, score
from onnxforge.pipeline.fp16 import convert_fp16
from onnxforge.pipeline.low_rank import low_rank
from onnxforge.pipeline.manifest import Manifest, StageRecord, describe_file, tool_versions
from onnxforge.pipeline.prune_channels import prune_channels
from onnxforge.pipeline.prune_magnitude import prune_magnitude
from onnxforge.pipeline.quantize import quantize
from onnxforge.pipeline.recipe import Recipe, StageSpec
from onnxforge.pipeline.run_guard import check_run_paths
from onnxforge.pipeline.simplify import simplify
from onnxforge.targets import get_target
from onnxforge.targets.feeds import batch_from_samples, generate_feeds
from onnxforge.targets.latency import compare_latency

__all__ = ["RunResult", "run_recipe"]

Progress = Callable[[str], None]


@dataclass
class RunResult:
    run_dir: Path
    manifest: Manifest
    metric: str | None

    @property
    def stages(self) -> list[StageRecord]:
        return self.manifest.stages


def _source_fingerprint(model: str) -> str:
    """A hash of what an export reads: the .py/.pt/.keras/.onnx file (and, for built-ins, the checkpoint)."""
    if model.startswith("builtin:"):
        from onnxforge.converters.digits_cnn import CHECKPOINT_PATH

        return model + ":" + file_sha256(CHECKPOINT_PATH)
    path_text = model.rpartition(":")[0] if model.rpartition(":")[0].endswith(".py") else model
    return model + ":" + file_sha256(path_text)


def _stage_key(spec: StageSpec, input_fingerprint: str, extra: dict[str, Any]) -> str:
    payload = json.dumps(
        {"kind": spec.kind, "config": spec.config.to_json(), "input": input_fingerprint, "extra": extra,
         "versions": tool_versions()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _run_stage(spec: StageSpec, recipe: Recipe, input_ref: str, output: Path) -> tuple[dict[str, Any], bool]:
    """Run one stage; returns (result json, verified)."""
    if spec.kind == "export":
        result = converters.export(input_ref, output, spec.config)
        return result.to_json(), result.verified or result.parity is None
    if spec.kind == "simplify":
        return simplify(input_ref, output, spec.config).to_json(), True
    if spec.kind == "prune":
        return prune_magnitude(input_ref, output, spec.config).to_json(), True
    if spec.kind == "quantize":
        return quantize(input_ref, output, recipe.calibration, spec.config).to_json(), True
    if spec.kind == "fp16":
        return convert_fp16(input_ref, output, spec.config).to_json(), True
    if spec.kind == "prune_channels":
        return prune_channels(input_ref, output, spec.config).to_json(), True
    if spec.kind == "low_rank":
        return low_rank(input_ref, output, spec.config).to_json(), True
    raise AssertionError(f"unknown stage kind {spec.kind}")


def _measure(manifest: Manifest, recipe: Recipe, progress: Progress) -> str | None:
    """Score and time every stage output; fills each record's metrics. Returns the metric name."""
    records = [r for r in [manifest.baseline, *manifest.stages] if r is not None and r.output is not None]
    if not records:
        return None
    paths = {r.name: manifest.run_dir / r.output["path"] for r in records}
    target = get_target(recipe.target)
    first = load_model(paths[records[0].name])
    specs = input_specs(first)
    metric_name = None
    if recipe.eval_data is not None:
        progress("scoring every stage on the evaluation data")
        samples = load_samples(recipe.eval_data, specs)
        batch = model_batch_size(specs, preferred=64)
        outputs = {name: run_outputs(target.session(p), samples, batch) for name, p in paths.items()}
        reference = outputs[records[0].name]
        metric = resolve_metric(Metric.AUTO, samples.labels is not None, tuple(reference[0].shape))
        metric_name = metric.value
        for r in records:
            r.metrics[metric.value] = score(metric, outputs[r.name], reference, samples.labels)
        feeds = batch_from_samples(samples.inputs, model_batch_size(specs, preferred=1))
    else:
        feeds = generate_feeds(specs, batch=1, overrides=dict(recipe.input_shapes))
    progress("timing every stage side by side (batch 1, 1 thread)")
    sessions = {name: target.session(p, threads=1) for name, p in paths.items()}
    timings = compare_latency(sessions, feeds, rounds=30)
    base = timings[records[0].name].p50_ms
    for r in records:
        r.metrics["latency_p50_ms"] = timings[r.name].p50_ms
        r.metrics["latency"] = timings[r.name].to_json()
        r.metrics["speedup_vs_first"] = base / timings[r.name].p50_ms
        r.metrics["bytes"] = r.output["bytes"]
    return metric_name


def run_recipe(
    recipe: Recipe,
    run_dir: str | os.PathLike,
    *,
    force: bool = False,
    measure: bool = True,
    progress: Progress | None = None,
) -> RunResult:
    """Run every stage of ``recipe`` into ``run_dir``; see the module docstring."""
    progress = progress or (lambda message: None)
    run_dir = Path(run_dir)
    check_run_paths(recipe, run_dir)  # a stage output may not overwrite what the run reads
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = {} if force else Manifest.previous_stages(run_dir)
    manifest = Manifest(run_dir, recipe.to_json())
    manifest.write()
    get_target(recipe.target).require()

    input_ref = recipe.model
    fingerprint = _source_fingerprint(recipe.model)
    if recipe.stages[0].kind != "export":
        # An .onnx recipe: the input model is the baseline every stage is scored and timed against.
        source = Path(recipe.model)
        manifest.baseline = StageRecord("input", "input", "input", {}, fingerprint, 0.0,
                                        describe_file(source, run_dir), {"path": str(source)})
    upstream_changed = False
    for index, spec in enumerate(recipe.stages, start=1):
        output = run_dir / f"{index:02d}_{spec.name}.onnx"
        # The key covers the data a stage reads, not only its path: edited data re-runs the stage.
        extra = {"calibration": content_sha256(recipe.calibration)} if spec.kind == "quantize" else {}
        for field_name in ("calibration_data", "eval_data"):
            if getattr(spec.config, field_name, None):
                extra[field_name] = content_sha256(getattr(spec.config, field_name))
        key = _stage_key(spec, fingerprint, extra)
        old = previous.get(spec.name)
        start = time.perf_counter()
        if (
            not upstream_changed
            and old is not None
            and old.get("key") == key
            and old.get("status") in ("done", "cached")
            and output.exists()
            and (old.get("output") or {}).get("sha256") == file_sha256(output)
        ):
            progress(f"{spec.name}: unchanged since the last run, re-using {output.name}")
            record = StageRecord(spec.name, spec.kind, "cached", spec.config.to_json(), key, 0.0,
                                 old["output"], old.get("result"), verified=old.get("verified", True))
        else:
            upstream_changed = True
            progress(f"{spec.name}: running")
            try:
                result, verified = _run_stage(spec, recipe, input_ref, output)
            except QualityGateError as e:
                kept = Path(e.best_path) if e.best_path else None
                record = StageRecord(spec.name, spec.kind, "quality-gate-failed", spec.config.to_json(), key,
                                     time.perf_counter() - start, describe_file(kept, run_dir) if kept and kept.exists() else None,
                                     verified=False, error=e.message)
                manifest.stages.append(record)
                manifest.write()
                raise
            except OnnxForgeError as e:
                manifest.stages.append(StageRecord(spec.name, spec.kind, "failed", spec.config.to_json(), key,
                                                   time.perf_counter() - start, error=e.message))
                manifest.write()
                raise
            record = StageRecord(spec.name, spec.kind, "done", spec.config.to_json(), key,
                                 time.perf_counter() - start, describe_file(output, run_dir), result, verified=verified)
        manifest.stages.append(record)
        manifest.write()
        input_ref = str(output)
        fingerprint = record.output["sha256"]

    metric = None
    if measure:
        metric = _measure(manifest, recipe, progress)
        manifest.write()
    from onnxforge.report import write_run_report

    write_run_report(manifest.to_json(), run_dir)  # report.html beside manifest.json, built from it
    return RunResult(run_dir, manifest, metric)


