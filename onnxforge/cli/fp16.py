"""``onnxforge fp16 MODEL -o OUT``: the ``fp16`` stage as a one-stage recipe."""

from __future__ import annotations

from pathlib import Path

import click

from onnxforge.cli.app import cli
from onnxforge.cli.door import run_command
from onnxforge.cli.options import (
    Flag,
    config_options,
    given_options,
    input_shape_option,
    json_option,
    model_argument,
    output_option,
    save_recipe_option,
    stage_cache_options,
)
from onnxforge.cli.simplify import parity_tolerance, shapes
from onnxforge.pipeline.command_run import CommandRecipe
from onnxforge.pipeline.fp16 import Fp16Config

SKIP = ("input_shapes", "tolerance")
FLAGS = (
    Flag("op_block_list", "--block-op"),
    Flag("sample_data", "--data", help="parity inputs from this .npz instead of random data"),
)


@cli.command()
@model_argument
@output_option
@input_shape_option
@config_options(Fp16Config, flags=FLAGS, skip=SKIP)
@click.option("--atol", type=float, default=None, help="parity: absolute tolerance  [default: 0.01]")
@click.option("--rtol", type=float, default=None, help="parity: relative tolerance  [default: 0.01]")
@stage_cache_options
@save_recipe_option
@json_option
@click.pass_context
def fp16(
    ctx: click.Context,
    model: Path,
    output: Path,
    input_shapes: tuple[str, ...],
    atol: float | None,
    rtol: float | None,
    **_: object,
) -> None:
    """Convert MODEL to fp16 for CUDA/TensorRT (inputs/outputs stay fp32), checking parity with fp32."""
    options = given_options(ctx, Fp16Config, FLAGS, SKIP) | parity_tolerance(ctx, atol, rtol)
    if input_shapes:
        options["input_shapes"] = shapes(input_shapes)
    command = CommandRecipe.build(model, [("fp16", options)])
    run_command(command, output, ctx, message=f"converting {model} to fp16")
