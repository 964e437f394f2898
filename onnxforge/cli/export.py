"""``onnxforge export SOURCE -o model.onnx``: the ``export`` stage as a one-stage recipe."""

from __future__ import annotations

from pathlib import Path

import click

from onnxforge.cli.app import cli
from onnxforge.cli.door import run_command
from onnxforge.cli.options import (
    Flag,
    config_options,
    given,
    given_options,
    input_shape_option,
    json_option,
    output_option,
    save_recipe_option,
)
from onnxforge.converters.config import ExportConfig
from onnxforge.errors import UsageError
from onnxforge.pipeline.command_run import CommandRecipe

# input_shapes/input_dtypes come from --input-shape, dynamic_axes from --dynamic, tolerance from --atol/--rtol
SKIP = ("input_shapes", "input_dtypes", "dynamic_axes", "tolerance")
FLAGS = (
    Flag("sample_inputs", "--sample", help=".npz inputs for the parity check"),
    Flag("timeout_s", "--timeout", click_type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
         help="file.py:callable sources run in a child process; stop it after this long  "
         "[default: 1800]"),
)


def dynamic_axes(items: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """``--dynamic input_ids=1:sequence`` items into ``{name: {axis: dim}}``."""
    axes: dict[str, dict[int, str]] = {}
    for item in items:
        name, _, rest = item.partition("=")
        axis, _, dim = rest.partition(":")
        if not name or not axis.isdigit() or not dim:
            raise UsageError(f"--dynamic {item!r}: expected NAME=AXIS:DIM, e.g. input_ids=1:sequence")
        axes.setdefault(name, {})[int(axis)] = dim
    return axes


def shape_options(input_shapes: tuple[str, ...]) -> dict[str, dict]:
    """``--input-shape`` items as the export config's ``input_shapes`` and ``input_dtypes`` (recipe spelling)."""
    from onnxforge.targets.feeds import parse_input_dtypes, parse_input_shapes

    options: dict[str, dict] = {}
    shapes = parse_input_shapes(input_shapes)
    if shapes:
        options["input_shapes"] = {name: list(dims) for name, dims in shapes.items()}
    dtypes = parse_input_dtypes(input_shapes)
    if dtypes:
        options["input_dtypes"] = {name: str(dtype) for name, dtype in dtypes.items()}
    return options


@cli.command()
@click.argument("source")
@output_option
@input_shape_option
@click.option(
    "--dynamic", "dynamic_dims", multiple=True, metavar="NAME=AXIS:DIM", help="a dynamic dim, e.g. input_ids=1:sequence"
)
@config_options(ExportConfig, flags=FLAGS, skip=SKIP)
@click.option("--atol", type=float, default=None, help="parity: absolute tolerance  [default: 0.0001]")
@click.option("--rtol", type=float, default=None, help="parity: relative tolerance  [default: 0.001]")
@save_recipe_option
@json_option
@click.pass_context
def export(
    ctx: click.Context,
    source: str,
    output: Path,
    input_shapes: tuple[str, ...],
    dynamic_dims: tuple[str, ...],
    atol: float | None,
    rtol: float | None,
    **_: object,
) -> None:
    """Export SOURCE (file.py:callable, TorchScript .pt, torch.export .pt2, .keras, .onnx, builtin:digits_cnn,
    or a Hugging Face save_pretrained folder) to ONNX, checking parity."""
    options = given_options(ctx, ExportConfig, FLAGS, SKIP) | shape_options(input_shapes)
    if dynamic_dims:
        options["dynamic_axes"] = dynamic_axes(dynamic_dims)
    if given(ctx, "atol") or given(ctx, "rtol"):
        options["tolerance"] = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
    command = CommandRecipe.build(source, [("export", options)])
    run_command(command, output, ctx, message=f"exporting {source}", cached=False)
