"""``onnxforge merge MODEL [MODEL ...] -o OUT``: the ``merge`` stage (pre/post-processing and ensembles in one
graph) as a one-stage recipe. Its options build the nested ``MergeConfig`` (an image, audio or tokenizer
front, a post-processing block), saved in the recipe's spelling."""

from __future__ import annotations

from pathlib import Path

import click

from onnxforge.cli.app import cli
from onnxforge.cli.door import run_command
from onnxforge.cli.options import floats, json_option, output_option, save_recipe_option, size_hw, stage_cache_options
from onnxforge.errors import UsageError
from onnxforge.pipeline.command_run import CommandRecipe
from onnxforge.pipeline.merge import MergeConfig


def _merge_post_kinds() -> list:
    """merge --post choices: every post-processing block the library has."""
    from onnxforge.pipeline.merge import PostKind

    return [k for k in PostKind if k is not PostKind.NONE]


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@output_option
@click.option(
    "--pre",
    type=click.Choice(["image", "audio"]),
    default=None,
    help="prepend pre-processing: uint8 images or int16 audio in",
)
@click.option(
    "--layout", type=click.Choice(["hwc", "chw"]), default=None, help="image: one raw image's layout  [default: hwc]"
)
@click.option("--single", is_flag=True, help="image: one image per run ([H,W,C]) instead of a batch ([N,H,W,C])")
@click.option(
    "--size",
    metavar="HxW",
    default=None,
    help="image: the raw images' fixed size, resized to the model's (default: the model's)",
)
@click.option("--dynamic-size", is_flag=True, help="image: any raw size, resized to the model's")
@click.option(
    "--resize", type=click.Choice(["linear", "nearest"]), default=None, help="image: interpolation  [default: linear]"
)
@click.option("--scale", type=float, default=None, help="image: multiplier before mean/std [1/255]; audio: [1/32768]")
@click.option("--mean", metavar="M[,M,M]", default=None, help="image: per-channel mean subtracted after scaling")
@click.option("--std", metavar="S[,S,S]", default=None, help="image: per-channel std divided by")
@click.option(
    "--network-layout",
    type=click.Choice(["auto", "nchw", "nhwc"]),
    default=None,
    help="image: the model input's layout  [default: auto]",
)
@click.option(
    "--input",
    "pre_input",
    metavar="NAME",
    default=None,
    help="the model input the pre-processing feeds (default: the only fitting one)",
)
@click.option("--tokenizer", is_flag=True, help="prepend a BERT tokenizer (onnxruntime-extensions): text in")
@click.option(
    "--vocab",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="tokenizer: the model's vocab.txt (default: beside the model)",
)
@click.option(
    "--max-length", type=int, default=None, help="tokenizer: tokens kept, [CLS]/[SEP] included  [default: 512]"
)
@click.option("--cased", is_flag=True, help="tokenizer: a cased model (no lowercasing, accents kept)")
@click.option(
    "--post",
    type=click.Choice([k.value for k in _merge_post_kinds()]),
    default=None,
    help="append post-processing to the model's output",
)
@click.option("--top-k", type=int, default=None, help="topk: how many classes  [default: 5]")
@click.option("--no-softmax", is_flag=True, help="topk/argmax: rank the raw outputs, not softmax probabilities")
@click.option(
    "--post-output", metavar="NAME", default=None, help="the model output post-processed (default: the first)"
)
@click.option(
    "--mask-input",
    metavar="NAME",
    default=None,
    help="mean-pool-l2: the attention-mask input  [default: attention_mask]",
)
@click.option(
    "--ensemble",
    type=click.Choice(["mean", "vote"]),
    default=None,
    help="several MODELS: average their outputs or vote on their argmax  [default: mean]",
)
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(path_type=Path),
    default=None,
    help="held-out samples (.npz keyed by the model's input names, optional 'label'): "
    "accuracy of the merged graph, the model and each member",
)
@click.option("--atol", type=float, default=1e-4, show_default=True, help="parity: absolute tolerance")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="parity: relative tolerance")
@stage_cache_options
@save_recipe_option
@json_option
@click.pass_context
def merge(
    ctx,
    models,
    output,
    pre,
    layout,
    single,
    size,
    dynamic_size,
    resize,
    scale,
    mean,
    std,
    network_layout,
    pre_input,
    tokenizer,
    vocab,
    max_length,
    cased,
    post,
    top_k,
    no_softmax,
    post_output,
    mask_input,
    ensemble,
    eval_data,
    atol,
    rtol,
    cache_dir,
    no_cache,
    force,
    save_recipe,
    json_path,
):
    """Merge MODEL (or several: an ensemble) with its pre- and post-processing into one deployable graph,
    parity checked against the steps run one by one."""
    from onnxforge.parity import Tolerance
    from onnxforge.pipeline.merge import (
        AudioPre,
        EnsembleMode,
        ImageLayout,
        ImagePre,
        PixelLayout,
        PostKind,
        ResizeMode,
        TokenizerConfig,
    )

    def refuse(options: dict[str, object], applies: bool, needs: str) -> None:
        given = [name for name, value in options.items() if value not in (None, False)]
        if given and not applies:
            raise UsageError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only with {needs}")

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
    pre_config = None
    if pre == "image":
        hw = size_hw(size, "--size")
        pre_config = ImagePre(
            layout=PixelLayout(layout or "hwc"), batched=not single, size=hw, dynamic_size=dynamic_size,
            resize=ResizeMode(resize or "linear"), scale=1 / 255 if scale is None else scale,
            mean=floats(mean, "--mean") or (0.0,), std=floats(std, "--std") or (1.0,),
            network_layout=ImageLayout(network_layout or "auto"), input=pre_input)
    elif pre == "audio":
        pre_config = AudioPre(scale=1 / 32768 if scale is None else scale, input=pre_input)
    config = MergeConfig(
        pre=pre_config,
        tokenizer=TokenizerConfig(
            vocab=vocab, lowercase=not cased, max_length=512 if max_length is None else max_length
        )
        if tokenizer
        else None,
        post=PostKind(post or "none"),
        top_k=5 if top_k is None else top_k,
        softmax=not no_softmax,
        post_output=post_output,
        mask_input=mask_input or "attention_mask",
        ensemble=EnsembleMode(ensemble or "mean"),
        eval_data=eval_data,
        tolerance=Tolerance(atol=atol, rtol=rtol),
    )
    options = _changed(config)
    if len(models) > 1:
        options["inputs"] = [str(m.resolve()) for m in models]
    command = CommandRecipe.build(models[0], [("merge", options)],
                                  eval_data=str(eval_data) if eval_data is not None else None)
    run_command(command, output, ctx, message=f"merging {', '.join(m.name for m in models)}", extra_reads=[vocab])


def _changed(config: MergeConfig) -> dict:
    """The config's fields that differ from the defaults, in the recipe's spelling (eval_data: the recipe's eval)."""
    from onnxforge.pipeline import codec

    given, default = codec.encode(config), codec.encode(MergeConfig())
    return {k: v for k, v in given.items() if v != default.get(k) and k != "eval_data"}
