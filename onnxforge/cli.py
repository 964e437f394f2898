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

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxforge.errors import OnnxForgeError, QualityGateError, UsageError

__all__ = ["main", "cli"]


class _ReaderGone(BaseException):
    """Our stdout's reader went away (``| head``). Not an OSError: click and rich would each turn a
    BrokenPipeError into exit 1; main() stops quietly with 141."""


class _StdoutConsole(Console):
    def on_broken_pipe(self) -> None:
        raise _ReaderGone


class _StderrConsole(Console):
    def on_broken_pipe(self) -> None:
        self.quiet = True  # nobody reads our messages any more; keep going, print nothing


# Piped output (CI logs, `| tee`) gets a width that fits the tables instead of rich's 80 columns.
out = _StdoutConsole(width=None if sys.stdout.isatty() else 160)
err = _StderrConsole(stderr=True, width=None if sys.stderr.isatty() else 160)


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


def timeout_option(help_text: str) -> Callable[[Callable], Callable]:
    """``--timeout``: how long the user's code (file.py:callable) may run in its child process."""
    from onnxforge.converters._isolation import SOURCE_TIMEOUT_S

    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=int(SOURCE_TIMEOUT_S),
                        show_default=True, metavar="SECONDS", help=help_text)


def json_option(f: Callable) -> Callable:
    @functools.wraps(f)
    def checked(*args, **kwargs):
        _check_json_path(kwargs.get("json_path"), kwargs)  # before any work, not after the model is written
        return f(*args, **kwargs)

    return click.option(
        "--json", "json_path", metavar="PATH", default=None, help="also write the result as JSON to PATH ('-' = stdout)"
    )(checked)


_WRITTEN_PARAMS = ("output", "html_path")  # a command's other output files
_OUTPUT_FOLDERS = ("run_dir", "mobile_dir")


_SOURCE_PARAMS = ("source", "distill_source")


def _check_json_path(json_path: str | None, params: dict, *reads: Path, written: tuple = ()) -> None:
    """Refuse ``--json PATH`` when PATH is a file the command reads (its Path options, the export or
    distillation source) or writes (``-o``, ``--html``); a pipe or /dev/stdout is fine."""
    if not json_path or json_path == "-":
        return
    from onnxforge._atomic import check_output_path

    files = [v for k, v in params.items() if isinstance(v, Path) and k not in _WRITTEN_PARAMS + _OUTPUT_FOLDERS]
    for key in _SOURCE_PARAMS:  # export's SOURCE, prune --distill SOURCE: file.py:callable or a model file
        if isinstance(params.get(key), str):
            from onnxforge.converters.source import source_files

            files += source_files(params[key])
    others = [*written, *(params.get(k) for k in _WRITTEN_PARAMS)]
    check_output_path(json_path, *reads, *files, written=others, stream_ok=True)


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


def cache_options(f: Callable) -> Callable:
    f = click.option("--no-cache", is_flag=True, help="neither use nor fill the stage cache")(f)
    return click.option(
        "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="the content-addressed stage cache, shared by runs and search trials "
        "(default: $ONNXFORGE_CACHE_DIR or ~/.cache/onnxforge)",
    )(f)


def _cache(cache_dir: Path | None, no_cache: bool):
    from onnxforge.pipeline.cache import StageCache

    return StageCache(None) if no_cache else StageCache(cache_dir) if cache_dir else StageCache.default()


def _emit_json(json_path: str | None, payload: dict) -> None:
    """Write ``payload`` to ``--json PATH`` ('-' = stdout). PATH may not be a file the command read."""
    if not json_path:
        return
    text = json.dumps(payload, indent=2, default=str) + "\n"
    if json_path == "-":
        click.echo(text, nl=False)
        return
    from onnxforge._atomic import check_output_path, write_output_text

    ctx = click.get_current_context(silent=True)
    read = [v for v in (ctx.params.values() if ctx else ()) if isinstance(v, Path) and v.is_file()]
    sys.stdout.flush()  # a report to /dev/stdout comes after what was printed before it
    write_output_text(check_output_path(json_path, *read, stream_ok=True), text)


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


@contextlib.contextmanager
def _gate_report(json_path: str | None) -> Iterator[None]:
    """On exit 4 (a quality gate not met) still write ``--json`` and show every try with its numbers."""
    try:
        yield
    except QualityGateError as e:
        if e.result is not None:
            _emit_json(json_path, e.result)
            if not _quiet(json_path) and e.result.get("tried"):
                table = Table(title=f"tries ({e.result.get('gate')}; {e.result.get('quality', '')})")
                keys = [k for k in e.result["tried"][0] if not isinstance(e.result["tried"][0][k], dict)]
                for key in keys:
                    table.add_column(key)
                for t in e.result["tried"]:
                    table.add_row(*(f"{t[k]:.4g}" if isinstance(t[k], float) else str(t[k]) for k in keys))
                out.print(table)
        raise


def _memory_limit(text: str | None) -> int | None:
    from onnxforge.pipeline.quantize.calibration_memory import parse_memory_size

    return None if text is None else parse_memory_size(text)


def _quiet(json_path: str | None) -> bool:
    return json_path == "-"


# ----------------------------------------------------------------------------------------------


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise _ReaderGone from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
@timeout_option("file.py:callable sources run in a child process; stop it after this long")
@json_option
def export(source, output, input_shapes, dynamic_batch, dynamic_dims, opset, exporter, sample_inputs, atol, rtol, timeout, json_path):
    """Export SOURCE (file.py:callable, TorchScript .pt, torch.export .pt2, .keras, .onnx, builtin:digits_cnn) to ONNX, checking parity."""
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
        result = run_export(source, output, config, timeout=timeout)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    from rich.markup import escape

    from onnxforge.model_io import model_file_size

    out.print(f"[bold green]exported[/] {result.path} ({_human_bytes(model_file_size(result.path))}, opset {result.opset}, exporter {result.exporter})")
    for spec in result.inputs:
        out.print(f"  input  {spec.name}: {spec.shape_text()} {spec.dtype}")
    for spec in result.outputs:
        out.print(f"  output {spec.name}: {spec.shape_text()} {spec.dtype}")
    if result.parity is not None:
        out.print(f"  {result.parity.summary()}")
        for o in result.parity.outputs:
            out.print(f"    {o.name}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}")
        out.print(f"    inputs run: {escape('; '.join(result.parity_inputs))}", highlight=False)
    for note in result.notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")


@cli.command()
@model_argument
@output_option
@click.option("--method", type=click.Choice(["auto", "onnxsim", "onnxslim", "ort"]), default="auto", show_default=True)
@input_shape_option
@click.option("--data", "sample_data", type=click.Path(path_type=Path), default=None, help="parity inputs from this .npz instead of random data")
@json_option
def simplify(model, output, method, input_shapes, sample_data, json_path):
    """Simplify MODEL with onnxsim, onnxslim and onnxruntime; keep the smallest graph with parity."""
    from onnxforge.pipeline.simplify import SimplifyConfig, SimplifyMethod, simplify as run_simplify
    from onnxforge.targets.feeds import parse_input_shapes

    config = SimplifyConfig(method=SimplifyMethod(method), input_shapes=parse_input_shapes(input_shapes), sample_data=sample_data)
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
    out.print(f"[bold green]kept[/] {result.chosen}: {result.nodes_before} -> {result.nodes_after} nodes, "
              f"{_human_bytes(result.bytes_before)} -> {_human_bytes(result.bytes_after)}, wrote {result.path}")
    out.print(f"  parity measured on {escape(result.parity_inputs)}")
    _print_notes(result.notes)
    if result.parity_inputs.startswith("random") and any(c.parity and not c.parity.ok for c in result.candidates):
        out.print("  [yellow]note:[/] parity failed on random inputs; a model with large activations can fail on "
                  "noise and pass on real inputs: give real samples with --data")


@cli.command()
@model_argument
@output_option
@click.option("--calibration", required=True, type=click.Path(path_type=Path), help=".npz (arrays keyed by input name), a folder of .npz/.npy (read one file at a time), or a folder of images")
@target_option
@quality_options
@click.option("--method", "calibration_method", type=click.Choice(["minmax", "entropy", "percentile", "distribution"]), default="minmax", show_default=True)
@click.option("--max-samples", type=int, default=None, help="samples read from each data file at most: calibration, held-out and --eval (nothing past them is read)  [default: 256 calibration samples, all of --eval]")
@click.option("--exclude-node", multiple=True, help="node name to keep in float (repeatable)")
@click.option("--exclude-op", multiple=True, help="op type to keep in float (repeatable)")
@click.option("--threads", type=int, default=1, show_default=True, help="threads when timing candidates")
@click.option("--max-memory", metavar="SIZE", default=None, help="peak memory to stay under (e.g. 2G): calibration, scoring and the error analysis are sized to it from the data's real shapes; refused before any work (exit 2) when a batch of 1 cannot fit. Default: 80% of the memory available at the start")
@click.option("--scheme", "schemes", multiple=True, metavar="SCHEME", help="candidate to measure, e.g. qdq-u8s8-per-channel, qdq-u8s8-per-channel-matmul-smooth, dynamic-s8-per-channel-smooth, int4, fp16; options -matmul, -smooth, -percentile, -int8-embeddings (repeatable; default: the target's)")
@click.option("--float-embeddings", is_flag=True, help="leave embedding tables in float (default: int8 with per-row scales in every candidate)")
@click.option("--smooth-alpha", type=float, default=0.5, show_default=True, help="SmoothQuant migration strength for -smooth schemes")
@click.option("--int4-block-size", type=int, default=32, show_default=True, help="int4: weights per scale along K (a power of two >= 16)")
@click.option("--int4-accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True, help="int4: MatMulNBits compute type (0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8)")
@click.option("--symmetric-activations", is_flag=True, help="symmetric activation ranges (zero point in the middle)")
@click.option("--asymmetric-weights", is_flag=True, help="asymmetric weight ranges (default symmetric)")
@click.option("--mixed-precision/--no-mixed-precision", default=True, show_default=True, help="when the fastest candidate misses the tolerance, return its most sensitive nodes to float")
@click.option("--max-float-fraction", type=float, default=0.5, show_default=True, help="mixed precision keeps at most this share of quantized nodes in float")
@click.option("--image-size", metavar="HxW", default=None, help="images: resize to this size (default: the model input's)")
@click.option("--mean", metavar="M[,M,M]", default=None, help="images: per-channel mean subtracted after scaling to [0,1]")
@click.option("--std", metavar="S[,S,S]", default=None, help="images: per-channel std divided by")
@click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True, help="images: input layout")
@cache_options
@json_option
def quantize(model, output, calibration, target, eval_data, metric, tolerance, calibration_method, max_samples, exclude_node, exclude_op, threads, schemes, float_embeddings, smooth_alpha, int4_block_size, int4_accuracy_level, symmetric_activations, asymmetric_weights, mixed_precision, max_float_fraction, image_size, mean, std, layout, json_path, max_memory, cache_dir, no_cache):
    """Quantize MODEL (static or dynamic INT8, INT4 weight-only, FP16 on GPU targets): measure the target's candidates, keep the fastest within tolerance."""
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.calibration import IMAGE_SUFFIXES, ImageFolder, ImageLayout, ImagePreprocessing
    from onnxforge.pipeline.quantize import CalibrationMethod, QuantizeConfig, parse_scheme, quantize as run_quantize

    if max_samples is not None and max_samples < 1:
        raise UsageError("--max-samples must be at least 1")

    def floats(text: str | None, name: str) -> tuple[float, ...] | None:
        try:
            return None if text is None else tuple(float(v) for v in text.split(","))
        except ValueError:
            raise UsageError(f"{name} {text!r}: expected comma-separated numbers") from None

    image_options = (image_size, mean, std, layout != "auto")
    if any(image_options) or (calibration.is_dir() and not any(p.suffix in (".npz", ".npy") for p in calibration.iterdir())
                              and any(p.suffix.lower() in IMAGE_SUFFIXES for p in calibration.rglob("*"))):
        size = None
        if image_size:
            try:
                h, w = (int(v) for v in image_size.lower().split("x"))
                size = (h, w)
            except ValueError:
                raise UsageError(f"--image-size {image_size!r}: expected HxW, e.g. 224x224") from None
        calibration = ImageFolder(calibration, ImagePreprocessing(
            size=size, mean=floats(mean, "--mean") or (0.0,), std=floats(std, "--std") or (1.0,), layout=ImageLayout(layout)))
    config = QuantizeConfig(
        schemes=tuple(parse_scheme(s) for s in schemes) or None,
        activation_symmetric=symmetric_activations,
        weight_symmetric=not asymmetric_weights,
        mixed_precision=mixed_precision,
        max_float_fraction=max_float_fraction,
        target=target,
        calibration_method=CalibrationMethod(calibration_method),
        max_samples=max_samples,
        metric=Metric(metric),
        tolerance=tolerance,
        eval_data=eval_data,
        exclude_nodes=tuple(exclude_node),
        exclude_op_types=tuple(exclude_op),
        threads=threads,
        max_memory=_memory_limit(max_memory),
        quantize_embeddings=not float_embeddings,
        smooth_alpha=smooth_alpha,
        int4_block_size=int4_block_size,
        int4_accuracy_level=int4_accuracy_level,
    )
    try:
        with _status(f"quantizing {model}", _quiet(json_path)):
            result = run_quantize(model, output, calibration, config, cache=_cache(cache_dir, no_cache))
    except QualityGateError as e:
        if e.result is not None:  # exit 4 still shows every candidate and writes --json
            _emit_json(json_path, e.result)
            if not _quiet(json_path):
                _render_quantize(e.result, model.name, target)
        raise
    payload = result.to_json()
    _emit_json(json_path, payload)
    if not _quiet(json_path):
        _render_quantize(payload, model.name, target)


def _format_score(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f}%" if metric in ("accuracy", "agreement") else f"{value:.4f}"


def _speed_words(speedup: float | None, than: str = "fp32") -> str:
    """'1.70x faster than fp32', or '1.19x SLOWER than fp32' (never '0.84x faster')."""
    if speedup is None:
        return "speed not measured"
    if abs(speedup - 1.0) < 0.005:
        return f"the same speed as {than} (1.00x)"
    if speedup >= 1.0:
        return f"{speedup:.2f}x faster than {than}"
    return f"[yellow]{1 / speedup:.2f}x SLOWER than {than}[/]"


def _render_quantize(payload: dict, name: str, target: str) -> None:
    """The candidate table, the kept model and its largest errors, from the result's JSON."""
    metric = payload["metric"]
    table = Table(title=f"quantize {name} on {target} ({payload['gate']})")
    for col in ("candidate", metric, "p50 ms", "speed vs fp32", "size", "verdict"):
        table.add_column(col)
    table.add_row("fp32", _format_score(metric, payload["fp32_score"]), f"{payload['fp32_latency']['p50_ms']:.3f}",
                  "1.00x", "", "reference")
    for c in payload["candidates"]:
        speed = c["speedup_vs_fp32"]
        verdict = c["error"] or ("[bold green]chosen[/]" if c["scheme"] == payload["chosen"] and c["meets_tolerance"]
                                 else "[yellow]kept: the most accurate[/]" if c["scheme"] == payload["chosen"]
                                 else "ok" if c["meets_tolerance"] else "[red]over tolerance[/]")
        table.add_row(
            escape(c["scheme"]), _format_score(metric, c["score"]),
            f"{c['latency']['p50_ms']:.3f}" if c["latency"] else "-",
            "-" if speed is None else f"{speed:.2f}x" if speed >= 0.995 else f"[yellow]{speed:.2f}x (slower)[/]",
            _human_bytes(c["bytes"]), verdict,
        )
    out.print(table)
    chosen = next(c for c in payload["candidates"] if c["scheme"] == payload["chosen"])
    out.print(f"[bold green]wrote[/] {payload['path']}: {escape(chosen['scheme'])}, {_speed_words(chosen['speedup_vs_fp32'])}, "
              f"{metric} {_format_score(metric, chosen['score'])} (fp32 {_format_score(metric, payload['fp32_score'])})")
    if chosen["float_nodes"]:
        out.print(f"  kept in float: {', '.join(chosen['float_nodes'])}")
    errors = {e["node"]: e for e in payload.get("layer_errors", [])}
    offenders = [errors[n] for n in payload.get("top_offenders", []) if n in errors]
    if offenders:
        worst = Table(title="largest quantization error vs fp32 (SQNR; lower is worse)")
        for col in ("node", "op", "local dB", "end-to-end dB", "rel. error"):
            worst.add_column(col, justify="left" if col in ("node", "op") else "right")
        for e in offenders:
            db = lambda v: "inf" if v is None else f"{v:.1f}"  # noqa: E731
            worst.add_row(e["node"], e["op_type"], db(e["local_sqnr_db"]), db(e["sqnr_db"]), f"{e['relative_error']:.3f}")
        out.print(worst)
    for note in payload["notes"]:
        out.print(f"  [yellow]note:[/] {escape(note)}")


@cli.command()
@model_argument
@output_option
@click.option("--method", "prune_method", type=click.Choice(["magnitude", "channels", "low-rank"]), default="magnitude",
              show_default=True, help="magnitude: zero weights (smaller gzip, same speed); channels: remove channels "
              "(smaller and faster); low-rank: factor dense layers by SVD")
@click.option("--sparsity", type=float, default=None, help="magnitude: fraction of weights to zero  [default: 0.5]")
@click.option("--ratio", type=float, default=None,
              help="channels: fraction of channels to remove [default: 0.5]; low-rank: fraction of each layer's rank "
              "to remove (default: keep 95% of the singular-value energy)")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="channels: .npz for the least-squares repair; low-rank: for the data-aware factorization")
@click.option("--importance", type=click.Choice(["l2", "l1", "activation"]), default="l2", show_default=True, help="channels: ranking")
@click.option("--allocation", type=click.Choice(["uniform", "sensitivity"]), default="uniform", show_default=True,
              help="channels: the same ratio for every group, or per-group ratios from a scan (needs --calibration)")
@click.option("--repair", type=click.Choice(["auto", "least-squares", "none"]), default="auto", show_default=True,
              help="channels: auto = least squares when --calibration is given")
@click.option("--scope", type=click.Choice(["per-layer", "global"]), default="per-layer", show_default=True)
@click.option("--exclude", multiple=True, help="node name to leave dense (repeatable)")
@click.option("--distill", "distill_source", metavar="SOURCE", default=None,
              help="channels: then train the pruned model against SOURCE, the PyTorch model MODEL was exported from "
              "(file.py:callable or builtin:NAME), on the --calibration data")
@click.option("--epochs", type=int, default=30, show_default=True, help="--distill: training epochs (early stopping may end sooner)")
@click.option("--max-samples", type=click.IntRange(min=1), default=None,
              help="bound every use of the data: at most N calibration samples fit, at most N --eval samples are "
              "scored (a quarter of N held out without --eval); rows past them are never read")
@timeout_option("--distill with file.py:callable: the distillation runs in a child process; stop it after this long")
@quality_options
@json_option
def prune(model, output, prune_method, sparsity, ratio, calibration, importance, allocation, repair, scope, exclude,
          distill_source, epochs, max_samples, timeout, eval_data, metric, tolerance, json_path):
    """Prune MODEL: magnitude sparsity (default), structured channels (really faster) or low-rank factors.

    With --eval, the most-pruned model within tolerance is kept. With --distill SOURCE, the pruned
    channels model is then trained against SOURCE (distillation) and gated on --eval.
    """
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.prune.magnitude import MagnitudePruneConfig, Scope, prune_magnitude

    if distill_source is not None and prune_method != "channels":
        raise UsageError("--distill applies to --method channels")
    if prune_method == "channels":
        if distill_source is not None:
            _prune_distill_cmd(model, output, ratio, calibration, importance, allocation, repair, exclude,
                               distill_source, epochs, timeout, eval_data, metric, tolerance, json_path)
            return
        _prune_channels_cmd(model, output, ratio, sparsity, calibration, importance, allocation, repair, exclude, eval_data,
                            metric, tolerance, json_path, max_samples)
        return
    if prune_method == "low-rank":
        _prune_low_rank_cmd(model, output, ratio, sparsity, calibration, exclude, eval_data, metric, tolerance, json_path,
                            max_samples)
        return
    if ratio is not None or calibration is not None:
        raise UsageError("--ratio and --calibration apply to --method channels", hint="use --sparsity for magnitude pruning")
    sparsity = 0.5 if sparsity is None else sparsity
    config = MagnitudePruneConfig(
        sparsity=sparsity, scope=Scope(scope), exclude_nodes=tuple(exclude), eval_data=eval_data,
        metric=Metric(metric), tolerance=tolerance, max_samples=max_samples,
    )
    with _status(f"pruning {model}", _quiet(json_path)), _gate_report(json_path):
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
    out.print(f"  {_quality_text(result.quality)}")
    _print_notes(result.notes)


def _prune_low_rank_cmd(model, output, ratio, sparsity, calibration, exclude, eval_data, metric, tolerance, json_path,
                        max_samples=None) -> None:
    """``prune --method low-rank``: parse into LowRankConfig, run, render."""
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.prune.low_rank import LowRankConfig, RankRule, low_rank

    if sparsity is not None:
        raise UsageError("--sparsity applies to --method magnitude", hint="use --ratio for the fraction of rank to remove")
    config = LowRankConfig(
        rule=RankRule.ENERGY if ratio is None else RankRule.RATIO, ratio=0.5 if ratio is None else ratio,
        calibration_data=calibration, exclude_nodes=tuple(exclude), eval_data=eval_data, metric=Metric(metric),
        tolerance=tolerance, max_samples=max_samples,
    )
    with _status(f"factoring {model}", _quiet(json_path)), _gate_report(json_path):
        result = low_rank(model, output, config)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    for name, info in result.factored_layers.items():
        error = f", output error {info['output_error']:.4f} on held-out samples" if "output_error" in info else ""
        out.print(f"  {name}: {info['shape'][0]}x{info['shape'][1]} -> rank {info['rank']} (energy {info['energy']:.4f}{error})")
    for name, reason in result.skipped_layers.items():
        out.print(f"  [yellow]skipped[/] {name}: {reason}")
    out.print(f"[bold green]wrote[/] {result.path}: {len(result.factored_layers)} layers factored, params "
              f"{result.params_before:,} -> {result.params_after:,}; {_speed_text(result.speed)}")
    if result.score_before is not None:
        out.print(f"  quality {result.score_before:.4f} -> {result.score_after:.4f} ({result.gate})")
    out.print(f"  {_quality_text(result.quality)}")
    _print_notes(result.notes)


def _prune_channels_cmd(model, output, ratio, sparsity, calibration, importance, allocation, repair, exclude, eval_data,
                        metric, tolerance, json_path, max_samples=None) -> None:
    """``prune --method channels``: parse into ChannelPruneConfig, run, render."""
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.prune.channels import Allocation, ChannelPruneConfig, Importance, Repair, prune_channels

    if sparsity is not None:
        raise UsageError("--sparsity applies to --method magnitude", hint="use --ratio for the fraction of channels")
    config = ChannelPruneConfig(
        ratio=0.5 if ratio is None else ratio, importance=Importance(importance), allocation=Allocation(allocation),
        repair=Repair(repair),
        calibration_data=calibration, exclude_nodes=tuple(exclude), eval_data=eval_data, metric=Metric(metric),
        tolerance=tolerance, max_samples=max_samples,
    )
    with _status(f"pruning channels of {model}", _quiet(json_path)), _gate_report(json_path):
        result = prune_channels(model, output, config)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    table = Table(title=f"channel pruning of {Path(model).name} (ratio {result.ratio:.3g})")
    for col in ("layer", "channels", "note"):
        table.add_column(col)
    for name, change in result.pruned_layers.items():
        table.add_row(name, change, "pruned")
    for name, reason in result.skipped_layers.items():
        table.add_row(name, "-", f"[yellow]skipped:[/] {reason}")
    out.print(table)
    out.print(f"[bold green]wrote[/] {result.path}: params {result.params_before:,} -> {result.params_after:,}, "
              f"estimated MACs/sample {result.macs_before:,} -> {result.macs_after:,} "
              f"({result.macs_before / max(result.macs_after, 1):.2f}x fewer); {_speed_text(result.speed)}")
    if not result.repaired:
        out.print("  no least-squares repair (pass --calibration DATA to refit the layers after pruning)")
    if result.score_before is not None:
        repaired = f", before repair {result.score_without_repair:.4f}" if result.repaired else ""
        out.print(f"  quality {result.score_before:.4f} -> {result.score_after:.4f}{repaired} ({result.gate})")
    out.print(f"  {_quality_text(result.quality)}")
    _print_notes(result.notes)


def _speed_text(speed: dict | None) -> str:
    """A measured speedup, said as a person would (0.84x is 'slower', not '0.84x faster')."""
    if not speed:
        return "speed not measured"
    words = _speed_words(speed["speedup"], "the input")
    return f"measured {words} at batch {speed['batch']} (p50 {speed['input_p50_ms']:.3f} -> " \
           f"{speed['candidate_p50_ms']:.3f} ms)"


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")


def _quality_text(note: str) -> str:
    return f"[yellow]{escape(note)}[/]" if note.startswith("quality NOT") else escape(note)


def _prune_distill_cmd(model, output, ratio, calibration, importance, allocation, repair, exclude, source, epochs,
                       timeout, eval_data, metric, tolerance, json_path) -> None:
    """``prune --method channels --distill SOURCE``: prune (no gate: distillation recovers), then distill
    into OUTPUT and gate on --eval."""
    import tempfile

    from onnxforge._atomic import check_output_path
    from onnxforge.converters.distill import DistillConfig, distill
    from onnxforge.converters.source import source_files
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.prune.channels import Allocation, ChannelPruneConfig, Importance, Repair, prune_channels

    if calibration is None:
        raise UsageError("--distill trains on the --calibration data", hint="pass --calibration DATA.npz")
    prune_config = ChannelPruneConfig(ratio=0.5 if ratio is None else ratio, importance=Importance(importance),
                                      allocation=Allocation(allocation), repair=Repair(repair),
                                      calibration_data=calibration, exclude_nodes=tuple(exclude),
                                      gate=False)  # no gate here: distillation recovers, then it is gated
    config = DistillConfig(epochs=epochs, calibration_data=calibration, eval_data=eval_data, metric=Metric(metric),
                           tolerance=tolerance, timeout_s=timeout)
    target = check_output_path(output, model, calibration, eval_data, *source_files(source))
    with tempfile.TemporaryDirectory(prefix=".onnxforge-prune-", dir=target.parent.resolve()) as tmp:
        pruned_path = Path(tmp) / target.name  # beside the output; only the distilled model is kept
        with _status(f"pruning channels of {model}", _quiet(json_path)) as update:
            pruned = prune_channels(model, pruned_path, prune_config)
            result = distill(source, pruned_path, target, config, progress=update)
    _emit_json(json_path, {"prune": pruned.to_json(), "distill": result.to_json()})
    if _quiet(json_path):
        return
    _render_distill(pruned, result)


def _render_distill(pruned, result) -> None:
    out.print(f"pruned {pruned.ratio:.0%} of the channels: MACs/sample {pruned.macs_before:,} -> {pruned.macs_after:,}")
    out.print(f"[bold green]wrote[/] {result.path}: distilled {result.epochs_run} epochs in {result.train_seconds:.0f} s "
                  f"(best epoch {result.best_epoch}, stopped by {result.stopped}); held-out {result.held_out_metric} "
                  f"{result.held_out_before:.4f} -> {result.held_out_after:.4f}")
    out.print(f"  student = pruned graph before training: max err {result.parity_before['max_abs_error']:.1e}; "
                  f"exported vs trained: max err {result.parity_after['max_abs_error']:.1e}")
    if result.scores:
        s = result.scores
        out.print(f"  eval: teacher {s['teacher']:.4f}, repair only {s['repair_only']:.4f}, distilled "
                      f"{s['distilled']:.4f} ({result.gate})")
    for note in result.notes:
        out.print(f"  [yellow]note:[/] {note}")


@cli.command()
@model_argument
@target_option
@click.option("--batch", "batches", type=int, multiple=True, default=(1,), show_default=True, help="batch size (repeatable: a sweep)")
@click.option("--threads", "threads", type=int, multiple=True, help="intra-op threads (repeatable; default: onnxruntime's, 2 on mobile)")
@input_shape_option
@click.option("--data", "sample_data", type=click.Path(path_type=Path), default=None, help="inputs from this .npz instead of random data")
@click.option("--min-seconds", type=float, default=1.0, show_default=True, help="time spent per measurement")
@click.option("--per-op", is_flag=True, help="also profile per node and op type (onnxruntime profiler) with EP placement")
@click.option("--top", type=int, default=10, show_default=True, help="rows in the per-op tables")
@click.option("--compare", "compare", type=click.Path(dir_okay=False, path_type=Path), default=None, help="time this second model interleaved with MODEL and report the ratio")
@click.option("-o", "--output-dir", "mobile_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="mobile: folder for the .ort and ops config (default: MODEL_mobile/ beside MODEL)")
@click.option("--html", "html_path", metavar="PATH", default=None, help="also write a self-contained HTML report with charts")
@json_option
def profile(model, target, batches, threads, input_shapes, sample_data, min_seconds, per_op, top, compare, mobile_dir, html_path, json_path):
    """Measure MODEL's latency on a target (p50/p90/p99, throughput) over batch sizes and thread counts;
    with --per-op the time per op and node and where each ran; --target mobile adds the ORT-format model
    and NNAPI/CoreML readiness."""
    from onnxforge.targets.feeds import parse_input_shapes
    from onnxforge.targets.profile import ProfileConfig, profile as run_profile

    if any(b < 1 for b in batches) or any(t < 1 for t in threads):
        raise UsageError("--batch and --threads must be at least 1")
    if top < 1:
        raise UsageError("--top must be at least 1")
    if html_path:
        from onnxforge._atomic import check_output_path

        check_output_path(html_path, model)  # fail before measuring, not after
    config = ProfileConfig(
        target=target, batch_sizes=tuple(batches), threads=tuple(threads) or (None,),
        input_shapes=parse_input_shapes(input_shapes), sample_data=sample_data, min_seconds=min_seconds,
        per_op=per_op, compare=compare, mobile_dir=mobile_dir,
    )
    with _status(f"profiling {model}", _quiet(json_path)):
        result = run_profile(model, config)
    payload = result.to_json()
    _emit_json(json_path, payload)
    if html_path:
        from onnxforge.report import profile_report_html, write_report

        write_report(html_path, profile_report_html(payload))
    if _quiet(json_path):
        return
    _render_profile(result, top)
    if html_path:
        out.print(f"report: {html_path}")


def _render_profile(result, top: int) -> None:
    emulation = " (host emulation, not a device measurement)" if result.host_emulation else ""
    out.print(f"inputs: {escape(result.inputs)}", highlight=False)
    table = Table(title=f"{result.path.name} on {result.target}{emulation}")
    for col in ("batch", "threads", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "samples/s", "runs"):
        table.add_column(col, justify="right")
    for r in result.rows:
        s = r.latency
        table.add_row(str(r.batch), str(r.threads or "default"), f"{s.p50_ms:.3f}", f"{s.p90_ms:.3f}", f"{s.p99_ms:.3f}",
                      f"{s.mean_ms:.3f}", f"{s.std_ms:.3f}", f"{s.throughput:.1f}", str(s.runs))
    out.print(table)
    if result.op_profile is not None:
        ops = result.op_profile
        kinds = Table(title=f"time per op type (top {top})")
        for col in ("op type", "nodes", "us/run", "share"):
            kinds.add_column(col, justify="left" if col == "op type" else "right")
        for o in ops.op_types[:top]:
            kinds.add_row(o.op_type, str(o.nodes), f"{o.median_us:.1f}", f"{o.share:.1%}")
        out.print(kinds)
        nodes = Table(title=f"slowest nodes (top {top})")
        for col in ("node", "op", "provider", "us/run", "share"):
            nodes.add_column(col, justify="right" if col in ("us/run", "share") else "left")
        for n in ops.nodes[:top]:
            nodes.add_row(n.name, n.op_type, n.provider, f"{n.median_us:.1f}", f"{n.share:.1%}")
        out.print(nodes)
        placement = ", ".join(f"{p.provider}: {p.nodes} nodes ({p.share:.0%})" for p in ops.placement)
        out.print(f"EP placement: {placement}; fell back from {ops.expected_provider}: {len(ops.fallback_nodes)} nodes")
        out.print(f"per-op sum {ops.op_sum_ms:.3f} ms vs measured p50 {ops.latency.p50_ms:.3f} ms: "
                  f"ops account for {ops.coverage:.0%} (profiler overhead {ops.profiler_overhead:.2f}x, {ops.runs} runs)")
        for note in ops.notes:
            out.print(f"  [yellow]note:[/] {note}")
    if result.comparison is not None:
        c = result.comparison
        out.print(f"compare (interleaved, batch {c.batch}): {c.model.name} p50 {c.model_latency.p50_ms:.3f} ms, "
                  f"{c.other.name} p50 {c.other_latency.p50_ms:.3f} ms; ratio {c.ratio:.3f} "
                  f"({c.other.name} is {1 / c.ratio:.2f}x as fast)")
    if result.mobile is not None:
        m = result.mobile
        verdicts = Table(title="mobile readiness (onnxruntime usability checker)")
        for col in ("EP", "as given", "fixed shapes", "supported nodes", "partitions", "unsupported ops"):
            verdicts.add_column(col)
        for given, fixed in zip(m.verdicts_as_given, m.verdicts):
            verdicts.add_row(fixed.ep.value, given.readiness.value, fixed.readiness.value,
                             f"{fixed.supported_nodes}/{fixed.total_nodes}", str(fixed.partitions),
                             ", ".join(fixed.unsupported_ops) or "-")
        out.print(verdicts)
        fixed_text = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in m.fixed_inputs.items()) or "none needed"
        out.print(f"fixed shapes: {fixed_text}; wrote {m.ort_model} ({_human_bytes(m.ort_model.stat().st_size)}), "
                  f"{m.operators_config} ({len(m.required_operators)} op lines)")
        out.print(f".ort vs .onnx: {m.parity.summary()}")
        for note in m.notes:
            out.print(f"  [yellow]note:[/] {note}")


@cli.command()
@model_argument
@output_option
@input_shape_option
@click.option("--block-op", multiple=True, help="op type to keep in fp32 (repeatable)")
@click.option("--data", "sample_data", type=click.Path(path_type=Path), default=None, help="parity inputs from this .npz instead of random data")
@json_option
def fp16(model, output, input_shapes, block_op, sample_data, json_path):
    """Convert MODEL to fp16 for CUDA/TensorRT (inputs/outputs stay fp32), checking parity with fp32."""
    from onnxforge.pipeline.fp16 import Fp16Config, convert_fp16
    from onnxforge.targets.feeds import parse_input_shapes

    config = Fp16Config(op_block_list=tuple(block_op), input_shapes=parse_input_shapes(input_shapes), sample_data=sample_data)
    with _status(f"converting {model} to fp16", _quiet(json_path)):
        result = convert_fp16(model, output, config)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    out.print(f"[bold green]wrote[/] {result.path}: {_human_bytes(result.bytes_before)} -> {_human_bytes(result.bytes_after)}; "
              f"{result.parity.summary()}")
    out.print(f"  parity measured on {result.parity_inputs}")
    out.print("  fp16 runs fast on GPU tensor cores; on a CPU it is slower than fp32 (profile it with --target cuda)")
    _print_notes(result.notes)


def _merge_post_kinds() -> list:
    """merge --post choices: every post-processing block the library has."""
    from onnxforge.pipeline.merge import PostKind

    return [k for k in PostKind if k is not PostKind.NONE]


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@output_option
@click.option("--pre", type=click.Choice(["image", "audio"]), default=None, help="prepend pre-processing: uint8 images or int16 audio in")
@click.option("--layout", type=click.Choice(["hwc", "chw"]), default=None, help="image: one raw image's layout  [default: hwc]")
@click.option("--single", is_flag=True, help="image: one image per run ([H,W,C]) instead of a batch ([N,H,W,C])")
@click.option("--size", metavar="HxW", default=None, help="image: the raw images' fixed size, resized to the model's (default: the model's)")
@click.option("--dynamic-size", is_flag=True, help="image: any raw size, resized to the model's")
@click.option("--resize", type=click.Choice(["linear", "nearest"]), default=None, help="image: interpolation  [default: linear]")
@click.option("--scale", type=float, default=None, help="image: multiplier before mean/std [1/255]; audio: [1/32768]")
@click.option("--mean", metavar="M[,M,M]", default=None, help="image: per-channel mean subtracted after scaling")
@click.option("--std", metavar="S[,S,S]", default=None, help="image: per-channel std divided by")
@click.option("--network-layout", type=click.Choice(["auto", "nchw", "nhwc"]), default=None, help="image: the model input's layout  [default: auto]")
@click.option("--input", "pre_input", metavar="NAME", default=None, help="the model input the pre-processing feeds (default: the only fitting one)")
@click.option("--tokenizer", is_flag=True, help="prepend a BERT tokenizer (onnxruntime-extensions): text in")
@click.option("--vocab", type=click.Path(dir_okay=False, path_type=Path), default=None, help="tokenizer: the model's vocab.txt (default: beside the model)")
@click.option("--max-length", type=int, default=None, help="tokenizer: tokens kept, [CLS]/[SEP] included  [default: 512]")
@click.option("--cased", is_flag=True, help="tokenizer: a cased model (no lowercasing, accents kept)")
@click.option("--post", type=click.Choice([k.value for k in _merge_post_kinds()]), default=None, help="append post-processing to the model's output")
@click.option("--top-k", type=int, default=None, help="topk: how many classes  [default: 5]")
@click.option("--no-softmax", is_flag=True, help="topk/argmax: rank the raw outputs, not softmax probabilities")
@click.option("--post-output", metavar="NAME", default=None, help="the model output post-processed (default: the first)")
@click.option("--mask-input", metavar="NAME", default=None, help="mean-pool-l2: the attention-mask input  [default: attention_mask]")
@click.option("--ensemble", type=click.Choice(["mean", "vote"]), default=None, help="several MODELS: average their outputs or vote on their argmax  [default: mean]")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None, help="held-out samples (.npz keyed by the model's input names, optional 'label'): accuracy of the merged graph, the model and each member")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="parity: absolute tolerance")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="parity: relative tolerance")
@json_option
def merge(models, output, pre, layout, single, size, dynamic_size, resize, scale, mean, std, network_layout, pre_input,
          tokenizer, vocab, max_length, cased, post, top_k, no_softmax, post_output, mask_input, ensemble, eval_data,
          atol, rtol, json_path):
    """Merge MODEL (or several: an ensemble) with its pre- and post-processing into one deployable graph,
    parity checked against the steps run one by one."""
    from onnxforge.parity import Tolerance
    from onnxforge.pipeline.merge import (AudioPre, EnsembleMode, ImageLayout, ImagePre, MergeConfig, PixelLayout, PostKind,
                                          ResizeMode, TokenizerConfig, merge as run_merge)

    def refuse(options: dict[str, object], applies: bool, needs: str) -> None:
        given = [name for name, value in options.items() if value not in (None, False)]
        if given and not applies:
            raise UsageError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only with {needs}")

    def floats(text: str | None, name: str) -> tuple[float, ...] | None:
        try:
            return None if text is None else tuple(float(v) for v in text.split(","))
        except ValueError:
            raise UsageError(f"{name} {text!r}: expected comma-separated numbers") from None

    image = {"--layout": layout, "--single": single, "--size": size, "--dynamic-size": dynamic_size, "--resize": resize,
             "--mean": mean, "--std": std, "--network-layout": network_layout}
    refuse(image, pre == "image", "--pre image")
    refuse({"--scale": scale, "--input": pre_input}, pre is not None, "--pre image or --pre audio")
    refuse({"--vocab": vocab, "--max-length": max_length, "--cased": cased}, tokenizer, "--tokenizer")
    refuse({"--top-k": top_k}, post == "topk", "--post topk")
    refuse({"--no-softmax": no_softmax}, post in ("topk", "argmax"), "--post topk or --post argmax")
    refuse({"--mask-input": mask_input}, post == "mean-pool-l2", "--post mean-pool-l2")
    refuse({"--post-output": post_output}, post is not None, "--post")
    refuse({"--ensemble": ensemble}, len(models) > 1, "two or more MODELS")
    if pre and tokenizer:
        raise UsageError("--pre and --tokenizer both prepend pre-processing; choose one")
    if json_path and json_path != "-":
        from onnxforge._atomic import check_output_path

        check_output_path(json_path, *models, eval_data, vocab)  # --json may not overwrite a model it reads
    pre_config = None
    if pre == "image":
        hw = None
        if size:
            try:
                h, w = (int(v) for v in size.lower().split("x"))
                hw = (h, w)
            except ValueError:
                raise UsageError(f"--size {size!r}: expected HxW, e.g. 224x224") from None
        pre_config = ImagePre(
            layout=PixelLayout(layout or "hwc"), batched=not single, size=hw, dynamic_size=dynamic_size,
            resize=ResizeMode(resize or "linear"), scale=1 / 255 if scale is None else scale,
            mean=floats(mean, "--mean") or (0.0,), std=floats(std, "--std") or (1.0,),
            network_layout=ImageLayout(network_layout or "auto"), input=pre_input)
    elif pre == "audio":
        pre_config = AudioPre(scale=1 / 32768 if scale is None else scale, input=pre_input)
    config = MergeConfig(
        pre=pre_config,
        tokenizer=TokenizerConfig(vocab=vocab, lowercase=not cased, max_length=512 if max_length is None else max_length)
        if tokenizer else None,
        post=PostKind(post or "none"), top_k=5 if top_k is None else top_k, softmax=not no_softmax,
        post_output=post_output, mask_input=mask_input or "attention_mask", ensemble=EnsembleMode(ensemble or "mean"),
        eval_data=eval_data, tolerance=Tolerance(atol=atol, rtol=rtol),
    )
    with _status(f"merging {', '.join(m.name for m in models)}", _quiet(json_path)):
        result = run_merge(list(models), output, config)
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    _render_merge(result)


def _render_merge(result) -> None:
    from onnxforge.model_io import model_file_size

    out.print(f"[bold green]merged[/] {escape(str(result.path))} ({_human_bytes(model_file_size(result.path))}): "
              f"{escape(' + '.join(result.blocks))}", highlight=False)
    for spec in result.inputs:
        out.print(f"  input  {spec.name}: {spec.shape_text()} {spec.dtype}", highlight=False)
    for spec in result.outputs:
        out.print(f"  output {spec.name}: {spec.shape_text()} {spec.dtype}", highlight=False)
    out.print(f"  {result.parity.summary()}", highlight=False)
    accuracy = result.accuracy
    if accuracy:
        table = Table(title=f"top-1 accuracy on {accuracy['samples']} held-out samples")
        table.add_column("graph")
        table.add_column("accuracy", justify="right")
        rows = [(f"member {name}", value) for name, value in (accuracy.get("members") or {}).items()]
        if "network" in accuracy:
            rows.append(("model alone", accuracy["network"]))
        rows.append(("merged graph" if "network" in accuracy else "merged ensemble", accuracy.get("merged")))
        for name, value in rows:
            table.add_row(escape(name), "-" if value is None else f"{value:.2%}")
        out.print(table)
    for old, new in result.renamed.items():
        out.print(f"  renamed {old} -> {new} (the name was taken)", highlight=False)
    for note in result.notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")


@cli.command(name="cache")
@click.option("--clear", is_flag=True, help="remove every cached stage output")
@cache_options
def cache_cmd(clear, cache_dir, no_cache):
    """Show where the stage cache is and how much it holds; --clear empties it."""
    cache = _cache(cache_dir, no_cache)
    if not cache.enabled:
        out.print("the stage cache is off (--no-cache)")
        return
    entries, size = cache.usage()
    if clear:
        removed = cache.clear()
        out.print(f"removed {removed} cached stage outputs ({_human_bytes(size)}) from {cache.root}")
        return
    out.print(f"stage cache {cache.root}: {entries} stage outputs, {_human_bytes(size)}")


def _target_b_option(f: Callable) -> Callable:
    from onnxforge.targets import TARGETS

    return click.option("--target-b", type=click.Choice(list(TARGETS)), default=None,
                        help="run MODEL_B on this target instead (e.g. CPU vs another EP)")(f)


@cli.command()
@click.argument("model_a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("model_b", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="inputs: .npz keyed by input name, or a folder of .npz/.npy")
@target_option
@_target_b_option
@click.option("--threshold", type=float, default=20.0, show_default=True, metavar="DB", help="SQNR below which a tensor counts as diverged")
@click.option("--max-samples", type=click.IntRange(min=1), default=16, show_default=True, help="samples run, one at a time")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="tensor rows shown, from just before the first divergence")
@click.option("--html", "html_path", metavar="PATH", default=None, help="also write an HTML report with the SQNR chart")
@json_option
def compare(model_a, model_b, data, target, target_b, threshold, max_samples, top, html_path, json_path):
    """Run MODEL_A and MODEL_B on the same inputs with every tensor as an output; report each matched tensor's
    error (SQNR, cosine, max abs) in graph order and where B first diverges from A."""
    from onnxforge.pipeline.compare import compare_models, compare_report_html

    if html_path:
        from onnxforge._atomic import check_output_path

        check_output_path(html_path, model_a, model_b, data)  # fail before running, not after
    with _status(f"comparing {model_a} and {model_b}", _quiet(json_path)):
        result = compare_models(model_a, model_b, data, target=target, target_b=target_b, threshold_db=threshold,
                                max_samples=max_samples)
    _emit_json(json_path, result.to_json())
    if html_path:
        from onnxforge.report import write_report

        write_report(html_path, compare_report_html(result))
    if _quiet(json_path):
        return
    _render_compare(result, top)
    if html_path:
        out.print(f"report: {html_path}")


def _render_compare(result, top: int) -> None:
    import math

    def db(value: float) -> str:
        return "identical" if not math.isfinite(value) else f"{value:.1f}"

    rows = list(result.tensors)
    first = result.first_divergence
    start = max(0, rows.index(first) - 3) if first in rows else 0
    shown = rows[start:start + top]
    table = Table(title=f"{result.model_b.name} vs {result.model_a.name}: tensors in graph order"
                  + (f" ({start + 1}-{start + len(shown)} of {len(rows)})" if len(shown) < len(rows) else ""))
    for col in ("tensor", "op", "matched by", "SQNR dB", "cosine", "max abs"):
        table.add_column(col, justify="left" if col in ("tensor", "op", "matched by") else "right")
    for t in [*shown, *result.outputs]:
        mark = "[bold red]" if t is first else ""
        table.add_row(f"{mark}{escape(t.name)}" + (" (output)" if t.matched_by == "output" else ""), t.op_type,
                      t.matched_by, db(t.sqnr_db), f"{t.cosine:.5f}", f"{t.max_abs:.3g}")
    out.print(table)
    out.print(escape(result.summary()) + f" ({result.samples} sample(s))")
    for note in result.notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")


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
    """One phrase per stage for the run table: the pass's own summary, or the error."""
    return stage.error[:80] if stage.error else stage.summary


def _render_run(result, json_path: str | None) -> None:

    _emit_json(json_path, result.manifest.to_json())
    if _quiet(json_path):
        return
    metric = result.metric
    table = Table(title=f"onnxforge run: {result.run_dir}")
    for col in ("stage", "file", "size", metric or "quality", "p50 ms (b=1)", "speedup", "status", "what it did"):
        table.add_column(col, justify="left" if col in ("stage", "file", "status", "what it did") else "right")
    for s in [result.manifest.baseline, *result.stages] if result.manifest.baseline else result.stages:
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
    report = result.run_dir / "report.html"
    out.print(f"files in {result.run_dir.resolve()}; manifest: {result.manifest.path}"
              + (f"; report: {report}" if report.exists() else ""))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="run folder (default: runs/<recipe name>)")
@click.option("--force", is_flag=True, help="re-run every stage, ignoring cached results")
@click.option("--max-memory", metavar="SIZE", default=None, help="peak memory each quantize stage stays under (e.g. 2G; see quantize --help). Default: 80% of the memory available when the stage starts")
@cache_options
@json_option
def run(recipe, run_dir, force, json_path, max_memory, cache_dir, no_cache):
    """Run the pipeline described by RECIPE (YAML) into a run folder, re-using unchanged stages."""
    import dataclasses

    from onnxforge.pipeline.recipe import load_recipe
    from onnxforge.pipeline.runner import run_recipe

    loaded = load_recipe(recipe)
    if max_memory is not None:  # not part of a stage's cache key: it changes whether a stage runs, not its output
        limit = _memory_limit(max_memory)
        loaded = dataclasses.replace(loaded, stages=tuple(
            dataclasses.replace(s, config=dataclasses.replace(s.config, max_memory=limit))
            if any(f.name == "max_memory" for f in dataclasses.fields(s.config)) else s
            for s in loaded.stages))
    run_dir = run_dir or Path("runs") / loaded.name
    from onnxforge.pipeline.run_guard import run_paths

    reads, writes = run_paths(loaded, run_dir)
    _check_json_path(json_path, {}, recipe, *reads, written=tuple(writes))
    with _status("running the pipeline", _quiet(json_path)) as update:
        result = run_recipe(loaded, run_dir, force=force, progress=update, cache=_cache(cache_dir, no_cache))
    _render_run(result, json_path)


@cli.command()
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--force", is_flag=True, help="re-run every stage, ignoring cached results")
@cache_options
@json_option
def demo(run_dir, force, json_path, cache_dir, no_cache):
    """Run the whole pipeline on the built-in digits CNN with real data, and show the per-stage table."""
    from onnxforge.demo import demo as run_demo

    with _status("running the demo pipeline", _quiet(json_path)) as update:
        result = run_demo(run_dir, force=force, progress=update, cache=_cache(cache_dir, no_cache))
    _render_run(result, json_path)


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


def _optimize_progress(quiet: bool):
    """A rich progress bar on a terminal (trials done, best so far, time left); silent otherwise."""
    import time as _time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet or not err.is_terminal:
        return contextlib.nullcontext(lambda event: None)

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[best]}"), console=err, transient=True) as progress:
            task = progress.add_task("preparing", total=None, best="")

            def update(event: dict) -> None:
                if "message" in event:
                    progress.update(task, description=escape(event["message"][:60]))
                    return
                ok = [r for r in event["records"] if r["status"] == "ok" and r["within_budget"] and r.get("speedup")]
                best = max(ok, key=lambda r: r["speedup"], default=None)
                left = ""
                if event.get("deadline"):
                    left = f", {max(0, event['deadline'] - _time.perf_counter()):.0f}s left"
                progress.update(task, description="trials", total=event["total"], completed=event["done"],
                                best=(f"best so far {best['speedup']:.2f}x (trial {best['number']})" if best else "")
                                + left)

            yield update

    return bar()


def _render_optimize(result, json_path: str | None) -> None:
    _emit_json(json_path, result.to_json())
    if _quiet(json_path):
        return
    table = Table(title=f"Pareto front: {result.gate} ({len(result.trials)} trials, {result.wall_seconds:.0f} s)")
    for col in ("file", "trial", "chain", result.metric, "speedup", "size", "in budget"):
        table.add_column(col, justify="right" if col in ("speedup", "size", result.metric) else "left")
    for r in result.front:
        mark = "[bold green]chosen[/]" if result.best and r["number"] == result.best["number"] else (
            "yes" if r["within_budget"] else "[red]no[/]")
        table.add_row(escape(r["front_path"]), str(r["number"]), escape(r["describe"]),
                      f"{r['quality'] * 100:.2f}%" if result.metric in ("accuracy", "agreement") else f"{r['quality']:.4f}",
                      f"{r['speedup']:.2f}x" if r.get("speedup") else "-", _human_bytes(r["bytes"]), mark)
    out.print(table)
    failed = [r for r in result.trials if r["status"] != "ok"]
    if failed:
        out.print(f"[yellow]{len(failed)} trial(s) failed[/] (recorded in pareto.json): "
                  + escape("; ".join(f"{r['number']}: {r.get('error', '')[:70]}" for r in failed[:3])))
    for note in result.notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")
    if result.best_path:
        b = result.best
        out.print(f"[bold green]best[/] {result.best_path}: {escape(b['describe'])}, {b.get('speedup', 0):.2f}x the input "
                  f"model's speed, {_human_bytes(b['bytes'])}")
    out.print(f"files in {result.run_dir.resolve()}: pareto.json, manifest.json, report: {result.run_dir / 'report.html'}")


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="run folder (the same folder continues an earlier search)")
@click.option("--calibration", type=click.Path(path_type=Path), help="samples for repair and quantization")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path),
              help="held-out samples (.npz keyed by input name; a 'label' array for accuracy)")
@target_option
@click.option("--max-drop", type=float, default=None, metavar="PTS", help="accuracy budget: points lost at most (needs labels)")
@click.option("--metric", type=click.Choice(["auto", "accuracy", "agreement", "cosine", "min-cosine", "rel-error"]),
              default="auto", show_default=True, help="the quality metric vs the input model")
@click.option("--tolerance", type=float, default=None, help="the budget in the metric's terms (see quantize --help)")
@click.option("--objective", type=click.Choice(["latency", "size"]), default="latency", show_default=True)
@click.option("--trials", type=int, default=24, show_default=True, help="trials at most (completed ones of an earlier run count)")
@click.option("--time-budget", default=None, metavar="DURATION", help="stop starting trials after this long (90s, 10m, 1h)")
@click.option("--strategy", type=click.Choice(["tpe", "nsga2", "random", "grid"]), default="tpe", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--pass", "passes", multiple=True, metavar="NAME", help="search only these passes (repeatable)")
@click.option("--space", "space", multiple=True, metavar="KNOB=V1,V2", help="pin a knob to values, e.g. prune_channels.ratio=0.25,0.5")
@click.option("--batch", type=int, default=1, show_default=True, help="batch size of the latency measurement")
@click.option("--threads", type=int, default=1, show_default=True, help="intra-op threads of the latency measurement")
@click.option("--min-speedup", type=float, default=None, help="stop early once a model within budget is this much faster")
@click.option("--ray-address", default=None, metavar="ADDR", help="run trials on Ray: local (a private instance), auto, or ray://host:port")
@input_shape_option
@cache_options
@json_option
def optimize(model, run_dir, calibration, eval_data, target, max_drop, metric, tolerance, objective, trials, time_budget,
             strategy, seed, passes, space, batch, threads, min_speedup, ray_address, input_shapes, cache_dir, no_cache,
             json_path):
    """Find the fastest (or smallest) model for the target within an accuracy budget: a search over
    pruning, low-rank and quantization, measured on the target; prints the Pareto front, writes best.onnx.

    MODEL is an .onnx file, a framework source (file.py:callable, .pt, .pt2, .keras, builtin:NAME), or a
    recipe .yaml whose 'search:' section holds these options (its model, data and target are used)."""
    from onnxforge.pipeline.data_spec import DataSpec
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.search import Objective, OptimizeConfig, Strategy, optimize as run_optimize
    from onnxforge.pipeline.search.space import SearchSpace
    from onnxforge.targets.feeds import parse_input_shapes

    if model.endswith((".yaml", ".yml")):
        from onnxforge.pipeline.recipe import load_recipe
        from onnxforge.pipeline.search.config import config_from_recipe

        from onnxforge.pipeline.run_guard import check_search_paths
        from onnxforge.pipeline.search.config import override_from_flags
        from onnxforge.pipeline.search.optimize import search_reads

        recipe = load_recipe(model)
        config = config_from_recipe(recipe, Path(model).parent.resolve())
        parse = {"--time-budget": _duration, "--space": _space_option, "--pass": tuple}
        flags = {flag: parse.get(flag, lambda v: v)(value) for flag, value in _given_flags(
            exclude=("model", "run_dir", "json_path", "cache_dir", "no_cache")).items()}
        config, notes = override_from_flags(config, flags)
        SearchSpace(config.target, config.passes, config.space, has_source=not recipe.model.endswith(".onnx"))
        check_search_paths(recipe.model, [Path(model), *search_reads(config)], run_dir, json_path=json_path)
        with _optimize_progress(_quiet(json_path)) as update:
            result = run_optimize(recipe.model, run_dir, config, progress=update, cache=_cache(cache_dir, no_cache),
                                  notes=notes)
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
        metric=Metric(metric), tolerance=tolerance, objective=Objective(objective), trials=trials,
        time_budget_s=_duration(time_budget), strategy=Strategy(strategy), seed=seed,
        passes=tuple(passes) or None, space=_space_option(space), batch=batch, threads=threads,
        input_shapes=parse_input_shapes(input_shapes), min_speedup=min_speedup, ray_address=ray_address,
    )
    from onnxforge.pipeline.run_guard import check_search_paths
    from onnxforge.pipeline.search.optimize import search_reads

    check_search_paths(model, search_reads(config), run_dir, json_path=json_path)
    try:
        with _optimize_progress(_quiet(json_path)) as update:
            result = run_optimize(model, run_dir, config, progress=update, cache=_cache(cache_dir, no_cache))
    except QualityGateError as e:
        if getattr(e, "result", None) is not None:
            _render_optimize(e.result, json_path)
        raise
    _render_optimize(result, json_path)


# ----------------------------------------------------------------------------------------------


def _print_error(error: OnnxForgeError) -> None:
    # Messages carry user text and pip extras like onnxforge[gpu]: escape them, or rich eats [..].
    # emoji=False: "model.py:three:" is a path, not the :three: emoji
    err.print(f"[bold red]error:[/] {escape(error.message)}", highlight=False, soft_wrap=True, emoji=False)
    if error.hint:
        err.print(f"[dim]hint:[/] {escape(error.hint)}", highlight=False, soft_wrap=True, emoji=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns (and exits with) the exit code."""
    from onnxforge._scratch import scratch_folder
    from onnxforge._signals import sigterm_raises

    with sigterm_raises(), scratch_folder():  # SIGTERM unwinds like Ctrl-C; temp folders in one place
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from onnxforge._ort_logs import set_ort_logging
    from onnxforge._signals import Terminated

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ONNXFORGE_DEBUG") == "1"
    set_ort_logging(debug)  # onnxruntime's own log lines would double our one error line
    try:
        cli.main(args=argv, prog_name="onnxforge", standalone_mode=False)
        sys.stdout.flush()  # a reader that left shows here, not as a message at interpreter exit
        code = 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:  # usage errors from option parsing
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False, soft_wrap=True)
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
    except Terminated:
        err.print("[bold red]terminated[/]: no partial output was written")
        code = 143
    except (_ReaderGone, BrokenPipeError):  # `onnxforge inspect m.onnx | head -n 1`: stop quietly
        _mute_stdout()
        code = 141
    except OSError as e:
        from onnxforge._atomic import WRITE_ERRNOS, os_error

        if debug:
            raise
        if e.errno in WRITE_ERRNOS:  # e.g. a library's temp file in a full $TMPDIR: the path and the reason
            _print_error(os_error(e))
            code = 2
        else:
            _print_internal_error(e)
            code = 1
    except Exception as e:  # a bug in onnxforge: one line, unless --debug
        if debug:
            raise
        _print_internal_error(e)
        code = 1
    return code


def _print_internal_error(e: Exception) -> None:
    from onnxforge.errors import first_line

    first = first_line(e) if str(e).strip() else ""
    err.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(first)}", highlight=False, soft_wrap=True)
    err.print("[dim]hint:[/] re-run with --debug for the traceback, and please report it", highlight=False)


def _mute_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's last flush of stdout cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
