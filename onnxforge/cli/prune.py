"""``onnxforge prune MODEL -o OUT``: one of three stages (magnitude ``prune``, ``prune_channels``,
``low_rank``), or ``prune_channels`` then ``distill`` with ``--distill SOURCE``, as a recipe.

Every field of every one of those configs has a flag; a flag given for a method that does not read it is
refused (``--sparsity`` with ``--method channels``).
"""

from __future__ import annotations

from pathlib import Path

import click

from onnxforge.cli.app import cli
from onnxforge.cli.door import run_command
from onnxforge.cli.options import (
    Flag,
    config_options,
    data_options,
    given,
    given_options,
    image_options,
    json_option,
    model_argument,
    options_for_other_methods,
    output_option,
    quality_options,
    save_recipe_option,
    stage_cache_options,
    target_option,
)
from onnxforge.converters.distill_config import DistillConfig
from onnxforge.errors import UsageError
from onnxforge.pipeline.command_run import CommandRecipe
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.prune.channels import ChannelPruneConfig
from onnxforge.pipeline.prune.low_rank import LowRankConfig
from onnxforge.pipeline.prune.magnitude import MagnitudePruneConfig

METHODS = {"magnitude": ("prune", MagnitudePruneConfig), "channels": ("prune_channels", ChannelPruneConfig),
           "low-rank": ("low_rank", LowRankConfig)}
# Spelled by the shared groups: --calibration, --eval/--metric/--tolerance, --target, --max-samples.
SHARED = ("calibration_data", "eval_data", "metric", "tolerance", "target", "max_samples")
FLAGS = (
    Flag("exclude_nodes", "--exclude"),
    Flag("timeout_s", "--timeout", click_type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
         help="--distill with file.py:callable: the distillation runs in a child process; stop it after this long  "
         "[default: 1800]"),
    Flag("time_budget_s", "--time-budget", metavar="SECONDS", help="--distill: stop training after this long"),
)
CONFIGS = (MagnitudePruneConfig, ChannelPruneConfig, LowRankConfig, DistillConfig)
LABELS = {MagnitudePruneConfig: "magnitude", ChannelPruneConfig: "channels", LowRankConfig: "low-rank",
          DistillConfig: "--distill"}


@cli.command()
@model_argument
@output_option
@click.option(
    "--method",
    "prune_method",
    type=click.Choice(list(METHODS)),
    default="magnitude",
    show_default=True,
    help="magnitude: zero weights (smaller gzip, same speed); channels: remove channels (smaller and faster); "
    "low-rank: factor dense layers by SVD",
)
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="channels: data for the least-squares repair; low-rank: for the data-aware factorization; "
              "--distill: the training data (.npz, a folder of .npz/.npy, or a folder of images)")
@click.option("--distill", "distill_source", metavar="SOURCE", default=None,
              help="channels: then train the pruned model against SOURCE, the PyTorch model MODEL was exported from "
              "(file.py:callable, builtin:NAME, or a Hugging Face folder), on the --calibration data")
@click.option("--max-samples", type=click.IntRange(min=1), default=None,
              help="bound every use of the data: at most N calibration samples fit, at most N --eval samples are "
              "scored (a quarter of N held out without --eval); rows past them are never read")
@target_option
@config_options(*CONFIGS, flags=FLAGS, skip=SHARED, labels=LABELS)
@quality_options
@image_options
@stage_cache_options
@save_recipe_option
@json_option
@click.pass_context
def prune(
    ctx: click.Context,
    model: Path,
    output: Path,
    prune_method: str,
    calibration: Path | None,
    distill_source: str | None,
    max_samples: int | None,
    target: str,
    eval_data: Path | None,
    metric: str,
    tolerance: float | None,
    **_: object,
) -> None:
    """Prune MODEL: magnitude sparsity (default), structured channels (really faster) or low-rank factors.

    With --eval, the most-pruned model within tolerance is kept. With --distill SOURCE, the pruned
    channels model is then trained against SOURCE (distillation) and gated on --eval.
    """
    kind, config_cls = METHODS[prune_method]
    used: list[type] = [config_cls]
    if distill_source is not None:
        if prune_method != "channels":
            raise UsageError("--distill applies to --method channels")
        if calibration is None:
            raise UsageError("--distill trains on the --calibration data", hint="pass --calibration DATA.npz")
        used.append(DistillConfig)
    where = f"--method {prune_method}" + (" --distill" if distill_source else "")
    options_for_other_methods(ctx, used, CONFIGS, where, FLAGS, SHARED)
    if prune_method == "magnitude" and calibration is not None:
        raise UsageError("--calibration applies to --method channels and low-rank",
                         hint="magnitude pruning reads no data but --eval")
    options = given_options(ctx, config_cls, FLAGS, SHARED) | _gate(metric, tolerance)
    if kind == "low_rank" and given(ctx, "ratio") and "rule" not in options:
        options["rule"] = "ratio"
    stages = [(kind, options)]
    if distill_source is not None:
        if metric not in {m.value for m in Metric}:  # MetricType gave file.py:function
            raise UsageError("--metric file.py:function does not apply with --distill yet: distillation gates on "
                             "a built-in metric", hint="use --metric accuracy / agreement / cosine with --distill")
        options["inputs"] = [str(model.resolve())]  # the recipe's model is the teacher; this stage reads MODEL
        options["name"] = "prune"
        options["gate"] = False  # no gate here: distillation recovers, then it is gated
        for key in ("metric", "tolerance"):
            options.pop(key, None)
        stages.append(("distill", given_options(ctx, DistillConfig, FLAGS, SHARED) | _gate(metric, tolerance)))
    calibration_spec, eval_data_spec = data_options(ctx)
    command = CommandRecipe.build(
        distill_source or model, stages, calibration=calibration_spec, eval_data=eval_data_spec, target=target,
        max_samples=max_samples)
    run_command(command, output, ctx, message=f"pruning {model}")


def _gate(metric: str, tolerance: float | None) -> dict[str, object]:
    return {k: v for k, v in (("metric", metric), ("tolerance", tolerance)) if v is not None and v != "auto"}

