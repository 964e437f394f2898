"""``onnxforge run RECIPE`` and ``onnxforge demo``: a recipe into a run folder, with the per-stage table."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from onnxforge.cli.app import cli
from onnxforge.cli.console import emit_json, human_bytes, out, quiet
from onnxforge.cli.door import stage_cache
from onnxforge.cli.options import cache_options, check_json_path, json_option, memory_limit
from onnxforge.cli.progress_view import progress_display


def _stage_summary(stage) -> str:
    """One phrase per stage for the run table: the pass's own summary, or the error."""
    return stage.error[:80] if stage.error else stage.summary


def _spread(latency: dict | None) -> str:
    """p90/p50 of a stage's timing, yellow when noisy (the threshold ``profile`` warns at)."""
    from onnxforge.targets.latency import NOISY_P90

    if not latency or not latency.get("p50_ms"):
        return "-"
    ratio = latency["p90_ms"] / latency["p50_ms"]
    return f"[yellow]{ratio:.2f}[/]" if ratio > NOISY_P90 else f"{ratio:.2f}"


def _render_run(result, json_path: str | None) -> None:

    emit_json(json_path, result.manifest.to_json())
    if quiet(json_path):
        return
    metric = result.metric
    table = Table(title=f"onnxforge run: {result.run_dir}")
    for col in ("stage", "file", "size", metric or "quality", "p50 ms (b=1)", "p90/p50", "speedup", "status",
                "what it did"):
        table.add_column(col, justify="left" if col in ("stage", "file", "status", "what it did") else "right")
    for s in [result.manifest.baseline, *result.stages] if result.manifest.baseline else result.stages:
        m = s.metrics
        quality = f"{m[metric] * 100:.2f}%" if metric in ("accuracy", "agreement") and metric in m else (
            f"{m[metric]:.4f}" if metric and metric in m else "-")
        status = s.status + ("" if s.verified else " (unverified)")
        table.add_row(
            s.name,
            str(s.output["path"]) if s.output else "-",
            human_bytes(s.output["bytes"]) if s.output else "-",
            quality,
            f"{m['latency_p50_ms']:.3f}" if "latency_p50_ms" in m else "-",
            _spread(m.get("latency")),
            f"{m['speedup_vs_first']:.2f}x" if "speedup_vs_first" in m else "-",
            status,
            _stage_summary(s),
        )
    out.print(table)
    for s in result.stages:  # a stage that did no work says where its file came from
        if s.status == "cached" and s.cache:
            out.print(f"[dim]cached:[/] {s.name}: {escape(s.cache)}")
    for s in result.stages:  # what the table's mean hides: churn, the worst sample, the interval
        if s.metrics.get("gate_checks"):
            out.print(f"  {escape(s.name)} vs the input: {escape(s.metrics['gate_checks'])}")
    report = result.run_dir / "report.html"
    out.print(f"files in {result.run_dir.resolve()}; manifest: {result.manifest.path}"
              + (f"; report: {report}" if report.exists() else ""))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="run folder (default: runs/<recipe name>)",
)
@click.option("--force", is_flag=True, help="re-run every stage, ignoring cached results")
@click.option(
    "--max-memory",
    metavar="SIZE",
    default=None,
    help="peak memory each quantize stage stays under (e.g. 2G; see quantize --help). "
    "Default: 80% of the memory available when the stage starts",
)
@cache_options
@json_option
def run(recipe, run_dir, force, json_path, max_memory, cache_dir, no_cache):
    """Run the pipeline described by RECIPE (YAML) into a run folder, re-using unchanged stages."""
    import dataclasses

    from onnxforge.pipeline.recipe import load_recipe
    from onnxforge.pipeline.runner import run_recipe

    loaded = load_recipe(recipe)
    if max_memory is not None:  # not part of a stage's cache key: it changes whether a stage runs, not its output
        limit = memory_limit(max_memory)
        loaded = dataclasses.replace(loaded, stages=tuple(
            dataclasses.replace(s, config=dataclasses.replace(s.config, max_memory=limit))
            if any(f.name == "max_memory" for f in dataclasses.fields(s.config)) else s
            for s in loaded.stages))
    run_dir = run_dir or Path("runs") / loaded.name
    from onnxforge.pipeline.run_guard import run_paths

    reads, writes = run_paths(loaded, run_dir)
    check_json_path(json_path, {}, recipe, *reads, written=tuple(writes))
    with progress_display("running the pipeline") as update:
        result = run_recipe(loaded, run_dir, force=force, progress=update, cache=stage_cache(cache_dir, no_cache))
    _render_run(result, json_path)


@cli.command()
@click.option(
    "-o",
    "--output",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
)
@click.option("--force", is_flag=True, help="re-run every stage, ignoring cached results")
@cache_options(cache_help="a stage cache to use instead of the demo's own (default: RUN_DIR/.cache, private to "
               "the run folder, so a first run computes every stage; e.g. ~/.cache/onnxforge for the shared one)")
@json_option
def demo(run_dir, force, json_path, cache_dir, no_cache):
    """Run the whole pipeline on the built-in digits CNN with real data, and show the per-stage table."""
    from onnxforge.demo import demo as run_demo
    from onnxforge.pipeline.cache import StageCache

    cache = StageCache(None) if no_cache else StageCache(cache_dir) if cache_dir else None  # None: the run's own
    with progress_display("running the demo pipeline") as update:
        result = run_demo(run_dir, force=force, progress=update, cache=cache)
    _render_run(result, json_path)
