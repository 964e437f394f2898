"""``onnxforge compare A B --data D``: tensor-by-tensor error between two models; ``inspect MODEL``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from onnxforge.cli.app import cli
from onnxforge.cli.console import emit_json, human_bytes, out, quiet
from onnxforge.cli.options import json_option, model_argument, target_option
from onnxforge.cli.progress_view import progress_display


def _target_b_option(f: Callable) -> Callable:
    from onnxforge.targets import TARGETS

    return click.option("--target-b", type=click.Choice(list(TARGETS)), default=None,
                        help="run MODEL_B on this target instead (e.g. CPU vs another EP)")(f)


@cli.command()
@click.argument("model_a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("model_b", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help="inputs: .npz keyed by input name, or a folder of .npz/.npy",
)
@target_option
@_target_b_option
@click.option(
    "--threshold",
    type=float,
    default=20.0,
    show_default=True,
    metavar="DB",
    help="SQNR below which a tensor counts as diverged",
)
@click.option(
    "--max-samples", type=click.IntRange(min=1), default=16, show_default=True, help="samples run, one at a time"
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="tensor rows shown, from just before the first divergence",
)
@click.option("--html", "html_path", metavar="PATH", default=None, help="also write an HTML report with the SQNR chart")
@json_option
def compare(model_a, model_b, data, target, target_b, threshold, max_samples, top, html_path, json_path):
    """Run MODEL_A and MODEL_B on the same inputs with every tensor as an output; report each matched tensor's
    error (SQNR, cosine, max abs) in graph order and where B first diverges from A."""
    from onnxforge.pipeline.compare import compare_models, compare_report_html

    if html_path:
        from onnxforge._atomic import check_output_path

        check_output_path(html_path, model_a, model_b, data)  # fail before running, not after
    with progress_display(f"comparing {model_a} and {model_b}") as update:
        result = compare_models(model_a, model_b, data, target=target, target_b=target_b, threshold_db=threshold,
                                max_samples=max_samples, progress=update)
    emit_json(json_path, result.to_json())
    if html_path:
        from onnxforge.report import write_report

        write_report(html_path, compare_report_html(result))
    if quiet(json_path):
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
    emit_json(json_path, info.to_json())
    if quiet(json_path):
        return
    out.print(f"[bold]{info.path}[/]  {human_bytes(info.bytes)}, {info.parameters:,} parameters, {info.nodes} nodes, "
              f"opset {info.opset}, producer {info.producer}")
    for spec in info.inputs:
        out.print(f"  input  {spec.name}: {spec.shape_text()} {spec.dtype}")
    for spec in info.outputs:
        out.print(f"  output {spec.name}: {spec.shape_text()} {spec.dtype}")
    out.print("  ops: " + ", ".join(f"{op} x{n}" for op, n in info.ops.items()))
