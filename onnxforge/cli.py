"""The ``onnxforge`` command line: each subcommand parses its options into the config objects the
Python API takes, calls one library function, and renders the result (a table, or JSON with
``--json PATH``, ``-`` for stdout). Errors print one line and a hint, never a traceback unless
``--debug``; the exit code says what kind of failure it was (see onnxforge.errors).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from onnxforge.errors import OnnxForgeError, QualityGateError, UsageError

__all__ = ["main", "cli"]

# Piped output (CI logs, `| tee`) gets a width that fits the tables instead of rich's 80 columns.
out = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


# ----------------------------------------------------------------------------------------------
# Shared option groups (defined once, like Polygraphy's tools/args)


def model_argument(f: Callable) -> Callable:
    return click.argument("model", type=click.Path(dir_okay=False, path_type=Path))(f)


def output_option(f: Callable) -> Callable:
    return click.option(
        "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="output .onnx path"
    )(f)


def input_shape_option(f: Callable) -> Callable:
    return click.option(
        "--input-shape",
        "input_shapes",
        multiple=True,
        metavar="NAME=DIMS[:DTYPE]",
        help="an input's shape, e.g. image=1x3x224x224 or input_ids=1x128:int64 (repeatable)",
    )(f)


def target_option(f: Callable) -> Callable:
    from onnxforge.targets import TARGETS

    return click.option(
        "--target", default="cpu", show_default=True, type=click.Choice(list(TARGETS)), help="execution target"
    )(f)


def json_option(f: Callable) -> Callable:
    return click.option(
        "--json", "json_path", metavar="PATH", default=None, help="also write the result as JSON to PATH ('-' = stdout)"
    )(f)


def quality_options(f: Callable) -> Callable:
    from onnxforge.pipeline.evaluate import Metric

    f = click.option(
        "--tolerance",
        type=float,
        default=None,
        help="accuracy: max drop in points (0.5); agreement: max disagreement in points (1.0); "
        "cosine: min mean cosine (0.99); rel-error: max (0.05)",
    )(f)
    f = click.option(
        "--metric",
        type=click.Choice([m.value for m in Metric]),
        default="auto",
        show_default=True,
        help="quality metric vs the fp32 model (auto: accuracy with labels, else top-1 agreement or cosine)",
    )(f)
    f = click.option(
        "--eval",
        "eval_data",
        type=click.Path(path_type=Path),
        default=None,
        help="held-out samples (.npz keyed by input name, optional 'label' array)",
    )(f)
    return f


def _emit_json(json_path: str | None, payload: dict) -> None:
    if not json_path:
        return
    text = json.dumps(payload, indent=2, default=str) + "\n"
    if json_path == "-":
        click.echo(text, nl=False)
        return
    from onnxforge._atomic import atomic_write_text, check_output_path

    atomic_write_text(check_output_path(json_path), text)


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@contextlib.contextmanager
def _status(message: str, quiet: bool) -> Iterator[Callable[[str], None]]:
    if quiet or not err.is_terminal:
        yield lambda m: None
        return
    with err.status(message) as status:
        yield lambda m: status.update(m)


def _quiet(json_path: str | None) -> bool:
    return json_path == "-"


# ----------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.version_option(package_name="onnxforge")
def cli(debug: bool) -> None:
    """Export, simplify, quantize, prune and profile ONNX models for deployment."""


@cli.command()
@click.argument("source")
@output_option
@input_shape_option
@click.option("--dynamic-batch", is_flag=True, help="make axis 0 of every input and output dynamic ('batch')")
@click.option("--dynamic", "dynamic_dims", multiple=True, metavar="NAME=AXIS:DIM", help="a dynamic dim, e.g. input_ids=1:sequence")
@click.option("--opset", type=int, default=None, help="target opset (dynamo produces at least 18)")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True)
@click.option("--sample", "sample_inputs", type=click.Path(path_type=Path), default=None, help=".npz inputs for the parity check")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="parity: absolute tolerance")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="parity: relative tolerance")
@json_option
def export(source, output, input_shapes, dynamic_batch, dynamic_dims, opset, exporter, sample_inputs, atol, rtol, json_path):
    """Export SOURCE (file.py:callable, TorchScript .pt, .keras, .onnx, builtin:digits_cnn) to ONNX, checking parity."""
    from onnxforge.converters import ExportConfig, Exporter, export as run_export
    from onnxforge.parity import Tolerance
    from onnxforge.targets.feeds import parse_input_dtypes, parse_input_shapes

    axes: dict[str, dict[int, str]] = {}
    for item in dynamic_dims:
        name, _, rest = item.partition("=")
        axis, _, dim = rest.partition(":")
        if not name or not axis.isdigit() or not dim:
            raise UsageError(f"--dynamic {item!r}: expected NAME=AXIS:DIM, e.g. input_ids=1:sequence")
        axes.setdefault(name, {})[int(axis)] = dim
    config = ExportConfig(
        input_shapes=parse_input_shapes(input_shapes),
        input_dtypes=parse_input_dtypes(input_shapes),
        dynamic_batch=dynamic_batch,
        dynamic_axes=axes,
        opset=opset,
        exporter=Exporter(exporter),
        tolerance=Tolerance(atol=atol, rtol=rtol),
        sample_inputs=sample_inputs,
    )
    with _status(f"exporting {source}", _quiet(json_path)):
        result = run_export(source, output, config)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    out.print(f"[bold green]exported[/] {result.path} ({_human_bytes(result.path.stat().st_size)}, opset {result.opset}, exporter {result.exporter})")
    for spec in result.inputs:
        out.print(f"  input  {spec.name}: {spec.shape_text()} {spec.dtype}")
    for spec in result.outputs:
        out.print(f"  output {spec.name}: {spec.shape_text()} {spec.dtype}")
    if result.parity is not None:
        out.print(f"  {result.parity.summary()}")
    for note in result.notes:
        out.print(f"  [yellow]note:[/] {note}")


@cli.command()
@model_argument
@output_option
@click.option("--method", type=click.Choice(["auto", "onnxsim", "onnxslim", "ort"]), default="auto", show_default=True)
@input_shape_option
@json_option
def simplify(model, output, method, input_shapes, json_path):
    """Simplify MODEL with onnxsim, onnxslim and onnxruntime; keep the smallest graph with parity."""
    from onnxforge.pipeline.simplify import SimplifyConfig, SimplifyMethod, simplify as run_simplify
    from onnxforge.targets.feeds import parse_input_shapes

    config = SimplifyConfig(method=SimplifyMethod(method), input_shapes=parse_input_shapes(input_shapes))
    with _status(f"simplifying {model}", _quiet(json_path)):
        result = run_simplify(model, output, config)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    table = Table(title=f"simplify {model.name}")
    for col in ("method", "nodes", "size", "time", "parity"):
        table.add_column(col)
    table.add_row("input", str(result.nodes_before), "", "", "")
    for c in result.candidates:
        parity = c.error or ("ok" if c.usable else f"FAILED ({c.parity.max_abs:.2g})" if c.parity else "-")
        table.add_row(c.method, str(c.nodes or "-"), _human_bytes(c.bytes), f"{c.seconds:.2f}s", parity)
    out.print(table)
    out.print(f"[bold green]kept[/] {result.chosen}: {result.nodes_before} -> {result.nodes_after} nodes, wrote {result.path}")


@cli.command()
@model_argument
@output_option
@click.option("--calibration", required=True, type=click.Path(path_type=Path), help=".npz (arrays keyed by input name) or a folder of .npz/.npy")
@target_option
@quality_options
@click.option("--method", "calibration_method", type=click.Choice(["minmax", "entropy", "percentile", "distribution"]), default="minmax", show_default=True)
@click.option("--max-samples", type=int, default=256, show_default=True, help="calibration samples used at most")
@click.option("--exclude-node", multiple=True, help="node name to keep in float (repeatable)")
@click.option("--exclude-op", multiple=True, help="op type to keep in float (repeatable)")
@click.option("--threads", type=int, default=1, show_default=True, help="threads when timing candidates")
@json_option
def quantize(model, output, calibration, target, eval_data, metric, tolerance, calibration_method, max_samples, exclude_node, exclude_op, threads, json_path):
    """Statically quantize MODEL to INT8: measure the candidate formats on the target, keep the fastest within tolerance."""
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.quantize import CalibrationMethod, QuantizeConfig, quantize as run_quantize

    if max_samples < 1:
        raise UsageError("--max-samples must be at least 1")
    config = QuantizeConfig(
        target=target,
        calibration_method=CalibrationMethod(calibration_method),
        max_calibration_samples=max_samples,
        metric=Metric(metric),
        tolerance=tolerance,
        eval_data=eval_data,
        exclude_nodes=tuple(exclude_node),
        exclude_op_types=tuple(exclude_op),
        threads=threads,
    )
    try:
        with _status(f"quantizing {model}", _quiet(json_path)):
            result = run_quantize(model, output, calibration, config)
    except QualityGateError:
        raise
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    table = Table(title=f"quantize {model.name} on {target} ({result.gate.describe()})")
    for col in ("candidate", result.gate.metric.value, "p50 ms", "speedup", "size", "verdict"):
        table.add_column(col)
    table.add_row("fp32", result.gate.format(result.fp32_score), f"{result.fp32_latency.p50_ms:.3f}", "1.00x", "", "reference")
    for c in result.candidates:
        verdict = c.error or ("[bold green]chosen[/]" if c.scheme == result.chosen else "ok" if c.meets_tolerance else "[red]over tolerance[/]")
        table.add_row(
            c.scheme,
            result.gate.format(c.score) if c.score is not None else "-",
            f"{c.latency.p50_ms:.3f}" if c.latency else "-",
            f"{c.speedup:.2f}x" if c.speedup else "-",
            _human_bytes(c.bytes),
            verdict,
        )
    out.print(table)
    chosen = result.chosen_candidate
    out.print(f"[bold green]wrote[/] {result.path}: {chosen.scheme}, {chosen.speedup:.2f}x faster than fp32, "
              f"{result.gate.metric.value} {result.gate.format(chosen.score)} (fp32 {result.gate.format(result.fp32_score)})")
    for note in result.notes:
        out.print(f"  [yellow]note:[/] {note}")


@cli.command()
@model_argument
@output_option
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="fraction of weights to zero")
@click.option("--scope", type=click.Choice(["per-layer", "global"]), default="per-layer", show_default=True)
@click.option("--exclude", multiple=True, help="node name to leave dense (repeatable)")
@quality_options
@json_option
def prune(model, output, sparsity, scope, exclude, eval_data, metric, tolerance, json_path):
    """Magnitude-prune MODEL's Conv/Gemm/MatMul weights (with --eval: the sparsest model within tolerance)."""
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.prune_magnitude import MagnitudePruneConfig, Scope, prune_magnitude

    config = MagnitudePruneConfig(
        sparsity=sparsity, scope=Scope(scope), exclude_nodes=tuple(exclude), eval_data=eval_data,
        metric=Metric(metric), tolerance=tolerance,
    )
    with _status(f"pruning {model}", _quiet(json_path)):
        result = prune_magnitude(model, output, config)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    out.print(f"[bold green]wrote[/] {result.path}: sparsity {result.achieved_sparsity:.1%} over {len(result.pruned_layers)} layers"
              f" (asked {result.requested_sparsity:.0%})")
    out.print(f"  gzip size {_human_bytes(result.gzip_bytes_before)} -> {_human_bytes(result.gzip_bytes_after)}; "
              "dense kernels run no faster with zeros, so latency is unchanged")
    if result.score_before is not None:
        out.print(f"  quality {result.score_before:.4f} -> {result.score_after:.4f} ({result.gate})")


@cli.command()
@model_argument
@target_option
@click.option("--batch", "batches", type=int, multiple=True, default=(1,), show_default=True, help="batch size (repeatable: a sweep)")
@click.option("--threads", "threads", type=int, multiple=True, help="intra-op threads (repeatable; default: onnxruntime's)")
@input_shape_option
@click.option("--data", "sample_data", type=click.Path(path_type=Path), default=None, help="inputs from this .npz instead of random data")
@click.option("--min-seconds", type=float, default=1.0, show_default=True, help="time spent per measurement")
@json_option
def profile(model, target, batches, threads, input_shapes, sample_data, min_seconds, json_path):
    """Measure MODEL's latency on a target (p50/p90/p99, throughput) over batch sizes and thread counts."""
    from onnxforge.targets.feeds import parse_input_shapes
    from onnxforge.targets.profile import ProfileConfig, profile as run_profile

    if any(b < 1 for b in batches) or any(t < 1 for t in threads):
        raise UsageError("--batch and --threads must be at least 1")
    config = ProfileConfig(
        target=target, batch_sizes=tuple(batches), threads=tuple(threads) or (None,),
        input_shapes=parse_input_shapes(input_shapes), sample_data=sample_data, min_seconds=min_seconds,
    )
    with _status(f"profiling {model}", _quiet(json_path)):
        result = run_profile(model, config)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    table = Table(title=f"{model.name} on {result.target}")
    for col in ("batch", "threads", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "samples/s", "runs"):
        table.add_column(col, justify="right")
    for r in result.rows:
        s = r.latency
        table.add_row(str(r.batch), str(r.threads or "default"), f"{s.p50_ms:.3f}", f"{s.p90_ms:.3f}", f"{s.p99_ms:.3f}",
                      f"{s.mean_ms:.3f}", f"{s.std_ms:.3f}", f"{s.throughput:.1f}", str(s.runs))
    out.print(table)


@cli.command(name="inspect")
@model_argument
@json_option
def inspect_cmd(model, json_path):
    """Show MODEL's inputs/outputs, opset, op histogram, parameter count and size."""
    from onnxforge.inspection import inspect_model

    info = inspect_model(model)
    _emit_json(json_path, info.to_json())
    if _quiet(json_path):
        return
    out.print(f"[bold]{info.path}[/]  {_human_bytes(info.bytes)}, {info.parameters:,} parameters, {info.nodes} nodes, "
              f"opset {info.opset}, producer {info.producer}")
    for spec in info.inputs:
        out.print(f"  input  {spec.name}: {spec.shape_text()} {spec.dtype}")
    for spec in info.outputs:
        out.print(f"  output {spec.name}: {spec.shape_text()} {spec.dtype}")
    out.print("  ops: " + ", ".join(f"{op} x{n}" for op, n in info.ops.items()))


def _stage_summary(stage) -> str:
    """One phrase per stage for the run table, from the stage's recorded result."""
    r = stage.result or {}
    if stage.error:
        return stage.error[:80]
    if stage.kind == "export":
        parity = r.get("parity") or {}
        worst = max((o["max_abs_error"] for o in parity.get("outputs", [])), default=None)
        return f"{r.get('exporter', '?')} exporter" + (f", parity max err {worst:.1e}" if worst is not None else "")
    if stage.kind == "simplify":
        return f"{r.get('chosen', '?')}: {r.get('nodes_before', '?')} -> {r.get('nodes_after', '?')} nodes"
    if stage.kind == "prune":
        return f"sparsity {r.get('achieved_sparsity', 0):.0%} (asked {r.get('requested_sparsity', 0):.0%})"
    if stage.kind == "quantize":
        return f"{r.get('chosen', '?')} of {len(r.get('candidates', []))} measured"
    return ""


def _render_run(result, json_path: str | None) -> None:
    from onnxforge.pipeline.manifest import Manifest  # noqa: F401  (type only)

    _emit_json(json_path, result.manifest.to_json())
    if _quiet(json_path):
        return
    metric = result.metric
    table = Table(title=f"onnxforge run: {result.run_dir}")
    for col in ("stage", "file", "size", metric or "quality", "p50 ms (b=1)", "speedup", "status", "what it did"):
        table.add_column(col, justify="left" if col in ("stage", "file", "status", "what it did") else "right")
    for s in result.stages:
        m = s.metrics
        quality = f"{m[metric] * 100:.2f}%" if metric in ("accuracy", "agreement") and metric in m else (
            f"{m[metric]:.4f}" if metric and metric in m else "-")
        status = s.status + ("" if s.verified else " (unverified)")
        table.add_row(
            s.name,
            str(s.output["path"]) if s.output else "-",
            _human_bytes(s.output["bytes"]) if s.output else "-",
            quality,
            f"{m['latency_p50_ms']:.3f}" if "latency_p50_ms" in m else "-",
            f"{m['speedup_vs_first']:.2f}x" if "speedup_vs_first" in m else "-",
            status,
            _stage_summary(s),
        )
    out.print(table)
    out.print(f"files in {result.run_dir.resolve()}; manifest: {result.manifest.path}")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="run folder (default: runs/<recipe name>)")
@click.option("--force", is_flag=True, help="re-run every stage, ignoring cached results")
@json_option
def run(recipe, run_dir, force, json_path):
    """Run the pipeline described by RECIPE (YAML) into a run folder, re-using unchanged stages."""
    from onnxforge.pipeline.recipe import load_recipe
    from onnxforge.pipeline.runner import run_recipe

    loaded = load_recipe(recipe)
    run_dir = run_dir or Path("runs") / loaded.name
    with _status("running the pipeline", _quiet(json_path)) as update:
        result = run_recipe(loaded, run_dir, force=force, progress=update)
    _render_run(result, json_path)


@cli.command()
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--force", is_flag=True, help="re-run every stage, ignoring cached results")
@json_option
def demo(run_dir, force, json_path):
    """Run the whole pipeline on the built-in digits CNN with real data, and show the per-stage table."""
    from onnxforge.demo import demo as run_demo

    with _status("running the demo pipeline", _quiet(json_path)) as update:
        result = run_demo(run_dir, force=force, progress=update)
    _render_run(result, json_path)


# ----------------------------------------------------------------------------------------------


def _print_error(error: OnnxForgeError) -> None:
    err.print(f"[bold red]error:[/] {error.message}", markup=True, highlight=False, soft_wrap=True)
    if error.hint:
        err.print(f"[dim]hint:[/] {error.hint}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns (and exits with) the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ONNXFORGE_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="onnxforge", standalone_mode=False)
        code = 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:  # usage errors from option parsing
        if debug:
            raise
        err.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
        err.print("[dim]hint:[/] see 'onnxforge --help' or 'onnxforge COMMAND --help'", highlight=False)
        code = 2
    except click.exceptions.Abort:
        err.print("[bold red]interrupted[/]")
        code = 130
    except OnnxForgeError as e:
        if debug:
            raise
        _print_error(e)
        code = e.exit_code
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: no partial output was written")
        code = 130
    except Exception as e:  # a bug in onnxforge: one line, unless --debug
        if debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {first}", highlight=False, soft_wrap=True)
        err.print("[dim]hint:[/] re-run with --debug for the traceback, and please report it", highlight=False)
        code = 1
    return code


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
