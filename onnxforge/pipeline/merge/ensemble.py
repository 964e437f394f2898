"""Ensembles: N models that take the same inputs, joined into one graph that feeds them all and
combines what they say.

- ``mean``: output j of the ensemble is ``(1/N) sum_i y_ij`` (ONNX ``Mean``), named like member 0's;
- ``vote``: each member votes for the argmax of its first output; ``votes`` [N, C] counts them and
  ``label`` is the class with most votes (the lower index among ties); further outputs are averaged.

The graph is built with ``onnx.compose``: every member is prefixed ``m0/``, ``m1/``, ... (so two
copies of the same model do not clash), a fan-out block copies each shared input to every member,
and a combine block reads the members' outputs. Members whose inputs differ (names, dtypes, static
dims) or whose outputs cannot be combined are a MergeError.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from onnxforge.errors import MergeError
from onnxforge.model_io import TensorSpec, default_opset, input_specs, output_specs
from onnxforge.pipeline.merge._compose import block_model, fan_out, join, spec_info, value_info

__all__ = ["EnsembleMode", "check_members", "combine_reference", "ensemble_model", "ensemble_output_names"]


class EnsembleMode(enum.Enum):
    MEAN = "mean"
    VOTE = "vote"


def _dims_clash(a: TensorSpec, b: TensorSpec) -> bool:
    if a.dtype != b.dtype or len(a.shape) != len(b.shape):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a.shape, b.shape, strict=True))


def _describe(spec: TensorSpec) -> str:
    return f"{spec.name} {spec.dtype}[{spec.shape_text()}]"


def check_members(members: Sequence[tuple[str, onnx.ModelProto]], mode: EnsembleMode) -> None:
    """Every member must take member 0's inputs and give outputs that can be combined; MergeError otherwise."""
    first_name, first = members[0]
    inputs = {s.name: s for s in input_specs(first)}
    outputs = output_specs(first)
    for name, model in members[1:]:
        theirs = {s.name: s for s in input_specs(model)}
        if set(theirs) != set(inputs):
            raise MergeError(
                f"ensemble members take different inputs: {first_name} takes {', '.join(inputs)}, "
                f"{name} takes {', '.join(theirs)}", hint="an ensemble feeds every member the same inputs")
        for key, spec in inputs.items():
            if _dims_clash(spec, theirs[key]):
                raise MergeError(f"ensemble members' input {key!r} differs: {first_name} has {_describe(spec)}, "
                                 f"{name} has {_describe(theirs[key])}",
                                 hint="an ensemble feeds every member the same inputs")
        their_outputs = output_specs(model)
        if len(their_outputs) != len(outputs):
            raise MergeError(f"ensemble members give {len(outputs)} and {len(their_outputs)} outputs "
                             f"({first_name}, {name}); they are combined position by position")
        for a, b in zip(outputs, their_outputs, strict=True):
            if _dims_clash(a, b):
                raise MergeError(f"ensemble members' outputs cannot be combined: {first_name} gives {_describe(a)}, "
                                 f"{name} gives {_describe(b)}")
        if (default_opset(model) or 0) != (default_opset(first) or 0):
            raise MergeError(f"ensemble members use opsets {default_opset(first)} ({first_name}) and "
                             f"{default_opset(model)} ({name}); one graph has one opset",
                             hint="export them with the same --opset")
    for spec in outputs:
        if spec.dtype.kind != "f":
            raise MergeError(f"an ensemble combines float outputs; {first_name}'s {spec.name!r} is {spec.dtype}")
    if mode is EnsembleMode.VOTE and len(outputs[0].shape) != 2:
        raise MergeError(f"vote needs class scores [batch, classes] as the first output; {first_name}'s "
                         f"{outputs[0].name!r} has shape {outputs[0].shape_text()}")


def ensemble_output_names(first: onnx.ModelProto, mode: EnsembleMode) -> list[str]:
    names = [s.name for s in output_specs(first)]
    return names if mode is EnsembleMode.MEAN else ["votes", "label", *names[1:]]


def ensemble_model(members: Sequence[tuple[str, onnx.ModelProto]], mode: EnsembleMode) -> onnx.ModelProto:
    """One graph: the shared inputs -> every member -> the combine block (see the module docstring)."""
    check_members(members, mode)
    first = members[0][1]
    specs = input_specs(first)
    prefixes = [f"m{i}/" for i in range(len(members))]
    graph = fan_out(specs, [(s.name, p + s.name) for p in prefixes for s in specs], first)
    member_outputs = []
    for (name, model), prefix in zip(members, prefixes, strict=True):
        renamed = compose.add_prefix(model, prefix)
        member_outputs.append([prefix + s.name for s in output_specs(model)])
        io_map = [(prefix + s.name, prefix + s.name) for s in specs]
        graph = join(graph, renamed, io_map, what=f"ensemble member {name}")
    combine = _combine_block(member_outputs, output_specs(first), mode, first)
    return join(graph, combine, [(n, n) for outs in member_outputs for n in outs], what="the ensemble's combine block")


def _combine_block(member_outputs: list[list[str]], specs: list[TensorSpec], mode: EnsembleMode,
                   like: onnx.ModelProto) -> onnx.ModelProto:
    inputs = [spec_info(spec, outs[j]) for outs in member_outputs for j, spec in enumerate(specs)]
    nodes, inits, outputs = [], [], []
    averaged = range(len(specs)) if mode is EnsembleMode.MEAN else range(1, len(specs))
    if mode is EnsembleMode.VOTE:
        first = specs[0]
        inits += [numpy_helper.from_array(np.array([-1], np.int64), "ensemble/last"),
                  numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "ensemble/off_on")]
        nodes.append(helper.make_node("Shape", [member_outputs[0][0]], ["ensemble/shape"]))
        nodes.append(helper.make_node("Gather", ["ensemble/shape", "ensemble/last"], ["ensemble/classes"]))
        ballots = []
        for i, outs in enumerate(member_outputs):
            nodes.append(helper.make_node("ArgMax", [outs[0]], [f"ensemble/choice{i}"], axis=-1, keepdims=0))
            nodes.append(helper.make_node("OneHot", [f"ensemble/choice{i}", "ensemble/classes", "ensemble/off_on"],
                                          [f"ensemble/ballot{i}"], axis=-1))
            ballots.append(f"ensemble/ballot{i}")
        nodes.append(helper.make_node("Sum", ballots, ["votes"]))
        nodes.append(helper.make_node("ArgMax", ["votes"], ["label"], axis=-1, keepdims=0))
        outputs += [value_info("votes", TensorProto.FLOAT, first.shape),
                    value_info("label", TensorProto.INT64, first.shape[:1])]
    for j in averaged:
        nodes.append(helper.make_node("Mean", [outs[j] for outs in member_outputs], [specs[j].name]))
        outputs.append(spec_info(specs[j]))
    return block_model(f"ensemble_{mode.value}", nodes, inputs, outputs, like, initializers=inits)


def combine_reference(mode: EnsembleMode, member_outputs: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The combine block in numpy: the members' outputs (each run on its own) -> the ensemble's outputs."""
    count = len(member_outputs[0])
    mean = [np.mean([np.asarray(o[j], np.float64) for o in member_outputs], axis=0).astype(member_outputs[0][j].dtype)
            for j in range(count)]
    if mode is EnsembleMode.MEAN:
        return mean
    classes = member_outputs[0][0].shape[-1]
    votes = sum(np.eye(classes, dtype=np.float32)[np.asarray(o[0]).argmax(-1)] for o in member_outputs)
    return [votes, votes.argmax(-1).astype(np.int64), *mean[1:]]
