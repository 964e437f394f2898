"""``onnxforge simplify MODEL -o OUT``: the ``simplify`` stage as a one-stage recipe."""

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
    model_argument,
    output_option,
    save_recipe_option,
    stage_cache_options,
)
from onnxforge.pipeline.command_run import CommandRecipe
from onnxforge.pipeline.simplify import SimplifyConfig

SKIP = ("input_shapes", "tolerance")  # --input-shape; --atol/--rtol
FLAGS = (
    Flag("sample_data", "--data", help="parity inputs from this .npz instead of random data"),
)


def parity_tolerance(ctx: click.Context, atol: float | None, rtol: float | None) -> dict[str, dict[str, float]]:
    """``--atol``/``--rtol`` as a config's ``tolerance`` (only what was given)."""
    if not (given(ctx, "atol") or given(ctx, "rtol")):
        return {}
    return {"tolerance": {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}}


def shapes(input_shapes: tuple[str, ...]) -> dict[str, list[int]]:
    from onnxforge.targets.feeds import parse_input_shapes

    return {name: list(dims) for name, dims in parse_input_shapes(input_shapes).items()}


@cli.command()
@model_argument
@output_option
@config_options(SimplifyConfig, flags=FLAGS, skip=SKIP)
@input_shape_option
@click.option("--atol", type=float, default=None, help="parity: absolute tolerance  [default: 0.0001]")
@click.option("--rtol", type=float, default=None, help="parity: relative tolerance  [default: 0.001]")
@stage_cache_options
@save_recipe_option
@json_option
@click.pass_context
def simplify(ctx: click.Context, model: Path, output: Path, input_shapes: tuple[str, ...], atol: float | None,
             rtol: float | None, cache_dir: Path | None, no_cache: bool, force: bool, save_recipe: Path | None,
             json_path: str | None, **_: object) -> None:
    """Simplify MODEL with onnxsim, onnxslim and onnxruntime; keep the smallest graph with parity."""
    options = given_options(ctx, SimplifyConfig, FLAGS, SKIP) | parity_tolerance(ctx, atol, rtol)
    if input_shapes:
        options["input_shapes"] = shapes(input_shapes)
    command = CommandRecipe.build(model, [("simplify", options)])
    run_command(command, output, ctx, message=f"simplifying {model}")
