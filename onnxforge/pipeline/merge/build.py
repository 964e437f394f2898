"""``merge``: one deployable graph from a model (or an ensemble of models) and its pre- and
post-processing, joined with ``onnx.compose``, checked against the same steps run one by one, and
measured on evaluation data.

Order of the joins: [ensemble of the members] -> post-processing appended to the network's output ->
pre-processing prepended to its input. The network itself is never rewritten: merging is a packaging
step, the last of a pipeline (quantizing or pruning after it would rewrite the merged pre/post blocks
too, so recipes refuse that order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxforge._atomic import atomic_write_text, check_output_path, paths_in
from onnxforge.errors import MergeError, QualityGateError, UsageError
from onnxforge.model_io import input_specs, load_model, output_specs, save_model
from onnxforge.pipeline.merge._compose import (
    fan_out,
    graph_names,
    join,
    network_opset,
    prefixed,
    unique_prefix,
    value_names,
)
from onnxforge.pipeline.merge.config import MergeConfig, MergeResult
from onnxforge.pipeline.merge.ensemble import EnsembleMode, ensemble_model, ensemble_output_names
from onnxforge.pipeline.merge.postprocess import PostKind, PostPlan, plan_postprocessing
from onnxforge.pipeline.merge.preprocess import AudioPlan, ImagePlan, plan_preprocessing
from onnxforge.pipeline.merge.tokenizer import TokenizerPlan, plan_tokenizer

__all__ = ["Composition", "compose_merged", "merge"]

PrePlan = ImagePlan | AudioPlan | TokenizerPlan


@dataclass
class Composition:
    """The merged graph and the plans it was built from (what the parity check replays step by step)."""

    model: onnx.ModelProto
    members: list[tuple[str, onnx.ModelProto]]
    network_outputs: list[str]  # the network's (or the ensemble's) output names
    pre: PrePlan | None
    post: PostPlan | None
    ensemble: EnsembleMode | None
    blocks: list[str]
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def uses_extensions(self) -> bool:
        return isinstance(self.pre, TokenizerPlan)


def _tap(model: onnx.ModelProto, input_name: str) -> tuple[onnx.ModelProto, str]:
    """``model`` with one more output: a copy of its input ``input_name`` (the post block needs the mask,
    and io_map joins only outputs to inputs)."""
    specs = input_specs(model)
    taken = graph_names(model)
    prefix = next(p for p in (f"tap{i or ''}/" for i in range(1000)) if not any(n.startswith(p) for n in taken))
    tap = fan_out(specs, [(s.name, prefix + s.name) for s in specs] + [(input_name, prefix + "copy")], model)
    return join(tap, model, [(prefix + s.name, s.name) for s in specs], what="the mask tap"), prefix + "copy"


def _free_names(model: onnx.ModelProto, wanted: set[str], notes: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """Keep the merged graph's interface names: a wanted name that is one of the model's internal values
    (a dynamo export calls a Gather output 'embedding') is freed by prefixing the model's internal
    names (``net/``, onnx.compose.add_prefix; its inputs and outputs keep theirs). Returns the model and
    the wanted names still taken: the model's own inputs/outputs, for which the block's names give way."""
    clash = wanted & value_names(model)
    interface = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    internal = sorted(clash - interface)
    if internal:
        prefix = unique_prefix("net/", model, interface | wanted)
        model = prefixed(model, prefix, inputs=False, outputs=False)
        notes.append(f"the model's internal value(s) {', '.join(internal)} renamed {prefix}..., "
                     "keeping the merged graph's names")
    return model, sorted(clash & interface)


def _describe_pre(plan: PrePlan) -> str:
    if isinstance(plan, ImagePlan):
        shape = plan.raw_input.shape_text()
        resize = ""
        if plan.resize_to:
            resize = f", resize to {plan.resize_to[0]}x{plan.resize_to[1]} ({plan.pre.resize.value})"
        return f"image pre (uint8 {plan.pre.layout.value} {shape}{resize})"
    if isinstance(plan, AudioPlan):
        return "audio pre (int16)"
    return f"tokenizer ({plan.vocab_path.name}, {len(plan.vocab.splitlines())} tokens)"


def compose_merged(
    members: Sequence[tuple[str, onnx.ModelProto]], config: MergeConfig, model_path: Path | None, notes: list[str]
) -> Composition:
    """Build the merged graph in memory (see the module docstring); MergeError when the blocks do not fit."""
    ensemble = config.ensemble if len(members) > 1 else None
    if len(members) == 1 and config.ensemble is not EnsembleMode.MEAN:
        notes.append(f"ensemble {config.ensemble.value} asks for several models; one was given")
    for name, model in members:
        network_opset(model, name)
    network = ensemble_model(members, ensemble) if ensemble else members[0][1]
    if ensemble:
        network_outputs = ensemble_output_names(members[0][1], ensemble)
    else:
        network_outputs = [s.name for s in output_specs(network)]
    blocks = [f"{ensemble.value} of {len(members)} models" if ensemble else "network"]
    if config.pre is not None:
        pre: PrePlan | None = plan_preprocessing(config.pre, network)
    elif config.tokenizer is not None:
        pre = plan_tokenizer(config.tokenizer, network, model_path)
    else:
        pre = None
    post = plan_postprocessing(config.post, network, output=config.post_output, top_k=config.top_k,
                               softmax=config.softmax, mask_input=config.mask_input, notes=notes)
    if ensemble is EnsembleMode.VOTE and post is not None and post.network_output.name in ("votes", "label"):
        raise MergeError(f"a vote already gives the label; {config.post.value} post-processing does not apply to it",
                         hint="use --ensemble mean with a post-processing block, or no --post with a vote")
    renamed: dict[str, str] = {}
    merged = network
    if post is not None:
        io_map = [(post.network_output.name, "x")]
        if post.mask is not None:
            merged, copy = _tap(merged, post.mask.name)
            io_map.append((copy, "mask"))
        merged, clash = _free_names(merged, set(post.outputs), notes)
        block = post.block(merged)
        prefix = unique_prefix("post/", block, graph_names(merged))
        if clash:
            renamed.update({name: prefix + name for name in post.outputs})
            notes.append(f"output name(s) {', '.join(clash)} already in the model: the merged outputs are "
                         f"{', '.join(prefix + n for n in post.outputs)}")
        block = prefixed(block, prefix, inputs=True, outputs=bool(clash))
        merged = join(merged, block, [(a, prefix + b) for a, b in io_map], what=f"the {post.kind.value} block")
        blocks.append(post.kind.value + (f" (k={post.top_k})" if post.kind is PostKind.TOPK else ""))
    if pre is not None:
        merged, clash = _free_names(merged, {s.name for s in pre.inputs} - set(pre.fed), notes)
        block, io_map = pre.block(merged)
        prefix = unique_prefix("pre/", block, graph_names(merged) - set(pre.fed))
        if clash:
            renamed.update({s.name: prefix + s.name for s in pre.inputs})
            notes.append(f"input name(s) {', '.join(clash)} already in the model: the merged inputs are "
                         f"{', '.join(prefix + s.name for s in pre.inputs)}")
        block = prefixed(block, prefix, inputs=bool(clash), outputs=True)
        merged = join(block, merged, [(prefix + a, b) for a, b in io_map], what="the pre-processing block")
        blocks.insert(0, _describe_pre(pre))
    merged.producer_name = "onnxforge.merge"
    try:
        onnx.checker.check_model(merged)
    except onnx.checker.ValidationError as e:  # pragma: no cover - every join is checked by merge_models
        raise MergeError(f"the merged graph fails the ONNX checker: {str(e).splitlines()[0]}") from e
    return Composition(merged, list(members), network_outputs, pre, post, ensemble, blocks, renamed)


def _member_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


_DEFAULT_CONFIG = MergeConfig()  # frozen: one shared default is safe


def merge(models: str | os.PathLike | Sequence[str | os.PathLike], output: str | os.PathLike,
          config: MergeConfig = _DEFAULT_CONFIG) -> MergeResult:
    """Merge ``models`` (one, or several for an ensemble) with the pre/post-processing in ``config``
    into ``output``.

    Returns a MergeResult: the merged graph's inputs and outputs, parity with the same steps run one
    by one (numpy pre/post, onnxruntime for each network) on random raw inputs and, with
    ``config.eval_data``, on the evaluation data turned back into raw inputs; and the accuracy of the
    merged graph, of the network and of every ensemble member. MergeError/UsageError (exit 2) leave no
    file; a parity failure keeps the file, writes ``<out>.unverified.json`` and raises QualityGateError
    (exit 4).
    """
    from onnxforge.pipeline.merge.check import check_parity, measure_accuracy

    paths = [Path(models)] if isinstance(models, (str, os.PathLike)) else [Path(m) for m in models]
    if not paths:
        raise UsageError("merge needs at least one model")
    out = check_output_path(output, *paths, *paths_in(config), *paths_in(config.tokenizer))
    members = [(name, load_model(path)) for name, path in zip(_member_names(paths), paths, strict=True)]
    notes: list[str] = []
    composition = compose_merged(members, config, paths[0], notes)
    if composition.uses_extensions:  # every other block is standard ONNX (benchmarks/merge_library.py)
        notes.append("the merged graph runs only where onnxruntime-extensions' custom ops are registered "
                     "(BertTokenizer): SessionOptions.register_custom_ops_library("
                     "onnxruntime_extensions.get_library_path())")
    parity, parity_inputs = check_parity(composition, config)
    accuracy = measure_accuracy(composition, config, notes) if config.eval_data is not None else None
    save_model(composition.model, out)
    note_path = out.with_name(out.name + ".unverified.json")
    result = MergeResult(
        path=out, models=[str(p) for p in paths], blocks=composition.blocks,
        inputs=input_specs(composition.model), outputs=output_specs(composition.model), parity=parity,
        parity_inputs=parity_inputs, accuracy=accuracy, renamed=composition.renamed, notes=notes,
        unverified_note=None if parity.ok else note_path,
    )
    if not parity.ok:
        atomic_write_text(note_path, json.dumps(result.to_json(), indent=2) + "\n")
        raise QualityGateError(
            f"merge into {out}: {parity.summary()}; the file is kept but is UNVERIFIED (see {note_path.name})",
            hint="loosen --atol/--rtol if the error is acceptable, or report the block that drifts",
            best_path=str(out))
    if note_path.exists():
        note_path.unlink()  # a stale note from an earlier failed merge to the same path
    return result
