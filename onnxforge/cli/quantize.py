"""``onnxforge quantize MODEL -o OUT --calibration DATA``: the ``quantize`` stage as a one-stage recipe."""

from __future__ import annotations

from pathlib import Path

import click

from onnxforge.cli.app import cli
from onnxforge.cli.door import run_command
from onnxforge.cli.options import (
    Flag,
    config_options,
    data_options,
    given_options,
    image_options,
    json_option,
    memory_limit,
    model_argument,
    output_option,
    quality_options,
    save_recipe_option,
    stage_cache_options,
    target_option,
    tune_session_option,
)
from onnxforge.pipeline.command_run import CommandRecipe
from onnxforge.pipeline.quantize import QuantizeConfig

# Spelled by the shared groups: --target, --eval/--metric/--tolerance, --max-samples (the recipe's top level).
SKIP = ("target", "eval_data", "metric", "tolerance", "max_samples")
FLAGS = (
    Flag("calibration_method", "--method"),
    Flag("exclude_nodes", "--exclude-node"),
    Flag("exclude_op_types", "--exclude-op"),
    Flag("max_memory", metavar="SIZE", click_type=str, convert=memory_limit,
         help="peak memory to stay under (e.g. 2G): calibration, scoring and the error analysis are sized to it from "
         "the data's real shapes; refused before any work (exit 2) when a batch of 1 cannot fit. Default: 80% of "
         "the memory available at the start"),
    Flag("schemes", "--scheme", metavar="SCHEME"),
    Flag("quantize_embeddings", "--float-embeddings", negate=True,
         help="leave embedding tables in float (default: int8 with per-row scales in every candidate)"),
    Flag("int4_accuracy_level", click_type=click.IntRange(0, 4)),
    Flag("activation_symmetric", "--symmetric-activations"),
    Flag("weight_symmetric", "--asymmetric-weights", negate=True, help="asymmetric weight ranges (default symmetric)"),
)


def max_samples_option(f):
    return click.option(
        "--max-samples", type=click.IntRange(min=1), default=None,
        help="samples read from each data file at most: calibration, held-out and --eval (nothing past them is read)  "
        "[default: 256 calibration samples, all of --eval]")(f)


@cli.command()
@model_argument
@output_option
@click.option(
    "--calibration",
    required=True,
    type=click.Path(path_type=Path),
    help=".npz (arrays keyed by input name), a folder of .npz/.npy (read one file at a time), or a folder of images",
)
@target_option
@quality_options
@max_samples_option
@tune_session_option
@config_options(QuantizeConfig, flags=FLAGS, skip=SKIP)
@image_options
@stage_cache_options
@save_recipe_option
@json_option
@click.pass_context
def quantize(
    ctx: click.Context,
    model: Path,
    output: Path,
    calibration: Path,
    target: str,
    eval_data: Path | None,
    metric: str,
    tolerance: float | None,
    max_samples: int | None,
    tune_session: bool,
    **_: object,
) -> None:
    """Quantize MODEL (static or dynamic INT8, INT4 weight-only, FP16 on GPU targets): measure the target's
    candidates, keep the fastest within tolerance."""
    options = given_options(ctx, QuantizeConfig, FLAGS, SKIP)
    options |= {k: v for k, v in (("metric", metric), ("tolerance", tolerance)) if ctx.params.get(k) is not None
                and (k != "metric" or v != "auto")}
    calibration_spec, eval_data_spec = data_options(ctx)
    command = CommandRecipe.build(
        model, [("quantize", options)], calibration=calibration_spec, eval_data=eval_data_spec, target=target,
        max_samples=max_samples, tune_session=tune_session)
    run_command(command, output, ctx, message=f"quantizing {model}")

