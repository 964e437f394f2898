"""``onnxforge optimize MODEL -o RUN``: the search for the fastest model within an accuracy budget."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from onnxforge.cli.app import cli
from onnxforge.cli.console import emit_json, human_bytes, out, quiet
from onnxforge.cli.door import stage_cache
from onnxforge.cli.options import (
    cache_options,
    config_options,
    gate_options,
    input_shape_option,
    json_option,
    target_option,
    tune_session_option,
)
from onnxforge.cli.progress_view import progress_display
from onnxforge.errors import QualityGateError, UsageError
from onnxforge.pipeline.gate_fields import GateRules


def _duration(text: str | None) -> float | None:
    """``90s``, ``10m``, ``1.5h`` or plain seconds."""
    if text is None:
        return None
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    number, unit = (text[:-1], text[-1]) if text and text[-1].lower() in units else (text, "s")
    try:
        seconds = float(number) * units[unit.lower()]
    except ValueError:
        raise UsageError(f"--time-budget {text!r}: expected a duration such as 90s, 10m or 1h") from None
    if seconds <= 0:
        raise UsageError(f"--time-budget {text!r}: must be positive")
    return seconds


def _space_option(items: tuple[str, ...]) -> dict[str, tuple]:
    """``--space prune_channels.ratio=0.25,0.5`` (values as YAML scalars) into the config's mapping."""
    import yaml

    space: dict[str, tuple] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--space {item!r}: expected KNOB=V1,V2,... e.g. prune_channels.ratio=0.25,0.5")
        parsed = []
        for v in values.split(","):
            value = yaml.safe_load(v)
            parsed.append([value] if key.endswith(".schemes") else value)
        space[key] = tuple(parsed)
    return space


def _counts(text: str, flag: str) -> int | tuple[int, ...]:
    """``--threads 2`` or ``--threads 1,2``: one count, or several (one front per setting)."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a count or comma-separated counts, e.g. 1,2") from None
    return values[0] if len(values) == 1 else values


def _given_flags(exclude: tuple[str, ...] = ()) -> dict[str, object]:
    """The current command's options typed on the command line (not defaults), by their long flag."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = {}
    for param in ctx.command.params:
        if param.name in exclude or not isinstance(param, click.Option):
            continue
        if ctx.get_parameter_source(param.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            given[max(param.opts, key=len)] = ctx.params[param.name]
    return given


def _render_optimize(result, json_path: str | None) -> None:
    emit_json(json_path, result.to_json())
    if quiet(json_path):
        return
    table = Table(title=f"Pareto front: {result.gate} ({len(result.trials)} trials, {result.wall_seconds:.0f} s)")
    for col in ("file", "trial", "chain", result.metric, "speedup", "size", "in budget"):
        table.add_column(col, justify="right" if col in ("speedup", "size", result.metric) else "left")
    for r in result.front:
        mark = "[bold green]chosen[/]" if result.best and r["number"] == result.best["number"] else (
            "yes" if r["within_budget"] else "[red]no[/]")
        table.add_row(
            escape(r["front_path"]),
            str(r["number"]),
            escape(r["describe"]),
            f"{r['quality'] * 100:.2f}%" if result.metric in ("accuracy", "agreement") else f"{r['quality']:.4f}",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
            human_bytes(r["bytes"]),
            mark,
        )
    out.print(table)
    failed = [r for r in result.trials if r["status"] != "ok"]
    if failed:
        out.print(f"[yellow]{len(failed)} trial(s) failed[/] (recorded in pareto.json): "
                  + escape("; ".join(f"{r['number']}: {r.get('error', '')[:70]}" for r in failed[:3])))
    for note in result.notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")
    if result.best_path:
        b = result.best
        out.print(
            f"[bold green]best[/] {result.best_path}: {escape(b['describe'])}, {b.get('speedup', 0):.2f}x the input "
            f"model's speed, {human_bytes(b['bytes'])}"
        )
    for s in result.settings:  # a best per (batch, threads) setting
        chosen = next((r for r in s["front"] if r["number"] == s["best"]), None)
        out.print(f"  batch {s['batch']}, {s['threads']} thread(s): " + (
            f"{s['best_path']} (trial {s['best']}, {chosen['speedup']:.2f}x)" if chosen else "nothing within budget"))
    out.print(
        f"files in {result.run_dir.resolve()}: pareto.json, manifest.json, report: {result.run_dir / 'report.html'}"
    )


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="run folder (the same folder continues an earlier search)")
@click.option("--calibration", type=click.Path(path_type=Path), help="samples for repair and quantization")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path),
              help="held-out samples (.npz keyed by input name; a 'label' array for accuracy)")
@target_option
@click.option(
    "--max-drop", type=float, default=None, metavar="PTS", help="accuracy budget: points lost at most (needs labels)"
)
@gate_options
@config_options(GateRules, skip=("metric", "tolerance"))  # --max-churn, --worst-cosine: as every gated stage's
@click.option("--objective", type=click.Choice(["latency", "size"]), default="latency", show_default=True)
@click.option(
    "--trials", type=int, default=24, show_default=True, help="trials at most (completed ones of an earlier run count)"
)
@click.option(
    "--time-budget", default=None, metavar="DURATION", help="stop starting trials after this long (90s, 10m, 1h)"
)
@click.option("--strategy", type=click.Choice(["tpe", "nsga2", "random", "grid"]), default="tpe", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pass", "passes", multiple=True, metavar="NAME", help="search only these passes (repeatable)")
@click.option(
    "--space",
    "space",
    multiple=True,
    metavar="KNOB=V1,V2",
    help="pin a knob to values, e.g. prune_channels.ratio=0.25,0.5",
)
@click.option("--batch", default="1", show_default=True, metavar="N[,N...]",
              help="batch size of the latency measurement; several (1,32): one front and best per setting")
@click.option("--threads", default="1", show_default=True, metavar="N[,N...]",
              help="intra-op threads of the latency measurement; several (1,2): one front and best per setting")
@click.option(
    "--min-speedup", type=float, default=None, help="stop early once a model within budget is this much faster"
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="run trials on Ray: local (a private instance), auto, or ray://host:port",
)
@tune_session_option
@input_shape_option
@cache_options
@json_option
def optimize(
    model,
    run_dir,
    calibration,
    eval_data,
    target,
    max_drop,
    metric,
    tolerance,
    max_churn,
    worst_cosine,
    objective,
    trials,
    time_budget,
    strategy,
    seed,
    passes,
    space,
    batch,
    threads,
    min_speedup,
    ray_address,
    tune_session,
    input_shapes,
    cache_dir,
    no_cache,
    json_path,
):
    """Find the fastest (or smallest) model for the target within an accuracy budget: a search over
    pruning, low-rank and quantization, measured on the target; prints the Pareto front, writes best.onnx.

    MODEL is an .onnx file, a framework source (file.py:callable, .pt, .pt2, .keras, builtin:NAME), or a
    recipe .yaml whose 'search:' section holds these options (its model, data and target are used)."""
    from onnxforge.pipeline import codec
    from onnxforge.pipeline.data_spec import DataSpec
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.run_guard import check_search_paths
    from onnxforge.pipeline.search import Objective, OptimizeConfig, Strategy
    from onnxforge.pipeline.search import optimize as run_optimize
    from onnxforge.pipeline.search.optimize import search_reads
    from onnxforge.pipeline.search.space import SearchSpace
    from onnxforge.pipeline.user_metric import UserMetric
    from onnxforge.targets.feeds import parse_input_shapes

    if model.endswith((".yaml", ".yml")):
        from onnxforge.pipeline.recipe import load_recipe
        from onnxforge.pipeline.search.config import config_from_recipe, override_from_flags

        recipe = load_recipe(model)
        config = config_from_recipe(recipe, Path(model).parent.resolve())
        parse = {"--time-budget": _duration, "--space": _space_option, "--pass": tuple,
                 "--batch": lambda v: _counts(v, "--batch"), "--threads": lambda v: _counts(v, "--threads")}
        flags = {flag: parse.get(flag, lambda v: v)(value) for flag, value in _given_flags(
            exclude=("model", "run_dir", "json_path", "cache_dir", "no_cache")).items()}
        config, notes = override_from_flags(config, flags)
        SearchSpace(config.target, config.passes, config.space, has_source=not recipe.model.endswith(".onnx"))
        check_search_paths(recipe.model, [Path(model), *search_reads(config)], run_dir, json_path=json_path)
        with progress_display("preparing the search") as update:
            result = run_optimize(
                recipe.model, run_dir, config, progress=update, cache=stage_cache(cache_dir, no_cache), notes=notes
            )
        _render_optimize(result, json_path)
        return
    if calibration is None or eval_data is None:
        raise UsageError("optimize needs --calibration and --eval (or a recipe .yaml with both)")
    if max_drop is not None:
        if metric not in ("auto", "accuracy") or tolerance is not None:
            raise UsageError("--max-drop is the accuracy budget; it does not combine with --metric/--tolerance")
        metric, tolerance = "accuracy", max_drop
    for path, flag in ((calibration, "--calibration"), (eval_data, "--eval")):
        if not path.exists():
            raise UsageError(f"{flag} {path}: no such file or folder")
    from onnxforge.converters.source import parse_source

    if not model.startswith("builtin:") and not parse_source(model).path.exists():
        raise UsageError(f"{model}: no such model file")
    config = OptimizeConfig(
        calibration=DataSpec(path=calibration), eval_data=DataSpec(path=eval_data), target=target,
        metric=codec.decode(UserMetric | Metric, metric, "--metric"), tolerance=tolerance, max_churn=max_churn,
        worst_cosine=worst_cosine,
        objective=Objective(objective), trials=trials,
        time_budget_s=_duration(time_budget), strategy=Strategy(strategy), seed=seed,
        passes=tuple(passes) or None, space=_space_option(space),
        batch=_counts(batch, "--batch"), threads=_counts(threads, "--threads"),
        input_shapes=parse_input_shapes(input_shapes), min_speedup=min_speedup, ray_address=ray_address,
        tune_session=tune_session,
    )
    check_search_paths(model, search_reads(config), run_dir, json_path=json_path)
    try:
        with progress_display("preparing the search") as update:
            result = run_optimize(model, run_dir, config, progress=update, cache=stage_cache(cache_dir, no_cache))
    except QualityGateError as e:
        if getattr(e, "result", None) is not None:
            _render_optimize(e.result, json_path)
        raise
    _render_optimize(result, json_path)
