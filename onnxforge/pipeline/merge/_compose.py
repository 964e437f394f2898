"""Joining blocks with ``onnx.compose``: each pre/post/ensemble block is a small model of its own,
built at the network's IR version and opset, and joined to it by ``merge_models`` with an io_map.

Name clashes are avoided by prefixes (``onnx.compose.add_prefix``): a block's internal names always
carry its prefix (``pre/``, ``post/``, ``m0/``); the interface names a user sees (the merged graph's
inputs and outputs) stay unprefixed unless they clash with a name already in the graph, in which case
they are prefixed too and the renaming is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import compose, helper

from onnxforge.errors import MergeError
from onnxforge.model_io import TensorSpec, default_opset

__all__ = ["MIN_OPSET", "block_model", "fan_out", "graph_names", "join", "unique_prefix", "value_info", "value_names"]

# The blocks use ops whose signatures are stable from opset 13 on (Softmax on one axis, ReduceSum and
# Squeeze/Unsqueeze with axes as an input, Resize with optional roi/scales).
MIN_OPSET = 13


def network_opset(model: onnx.ModelProto, what: str) -> int:
    opset = default_opset(model) or 0
    if opset < MIN_OPSET:
        raise MergeError(f"{what} uses opset {opset}; merging needs opset {MIN_OPSET} or newer",
                         hint="re-export it with a newer opset (onnxforge export --opset 17)")
    return opset


def value_info(name: str, dtype: np.dtype | int, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    elem = dtype if isinstance(dtype, int) else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def spec_info(spec: TensorSpec, name: str | None = None) -> onnx.ValueInfoProto:
    return value_info(name or spec.name, spec.dtype, spec.shape)


def block_model(
    name: str,
    nodes: Iterable[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    like: onnx.ModelProto,
    *,
    initializers: Sequence[onnx.TensorProto] = (),
    domains: Sequence[tuple[str, int]] = (),
) -> onnx.ModelProto:
    """A block as a model with ``like``'s IR version and default opset (merge_models needs both equal)."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", network_opset(like, "the model"))]
    opsets += [helper.make_opsetid(domain, version) for domain, version in domains]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=like.ir_version, producer_name="onnxforge.merge")
    onnx.checker.check_model(model)
    return model


def value_names(model: onnx.ModelProto) -> set[str]:
    """Every value name a merge could clash on: edges, initializers, value infos, graph inputs/outputs."""
    g = model.graph
    names = {n for node in g.node for n in [*node.input, *node.output] if n}
    names |= {i.name for i in g.initializer} | {v.name for v in g.value_info}
    names |= {v.name for v in g.input} | {v.name for v in g.output}
    return names


def graph_names(model: onnx.ModelProto) -> set[str]:
    """Value names and node names: what a block's prefix keeps apart."""
    return value_names(model) | {node.name for node in model.graph.node if node.name}


def unique_prefix(base: str, block: onnx.ModelProto, taken: set[str]) -> str:
    """``base`` (``pre/``), or ``pre_1/``, ``pre_2/``... : the first prefix under which no name of
    ``block`` collides with ``taken``."""
    stem = base.rstrip("/")
    for i in range(1000):
        prefix = base if i == 0 else f"{stem}_{i}/"
        if not {prefix + n for n in graph_names(block)} & taken:
            return prefix
    raise MergeError(f"no free name prefix for the {stem} block")  # pragma: no cover - 1000 clashing prefixes


def prefixed(block: onnx.ModelProto, prefix: str, *, inputs: bool, outputs: bool) -> onnx.ModelProto:
    return compose.add_prefix(block, prefix, rename_inputs=inputs, rename_outputs=outputs)


def join(
    first: onnx.ModelProto,
    second: onnx.ModelProto,
    io_map: Sequence[tuple[str, str]],
    *,
    outputs: Sequence[str] | None = None,
    what: str,
) -> onnx.ModelProto:
    """``onnx.compose.merge_models`` with its ValueErrors (opset or IR mismatch, clashing names) as MergeError."""
    if first.ir_version != second.ir_version:  # a newer IR reads an older one: lift the lower to the higher
        low = first if first.ir_version < second.ir_version else second
        lifted = onnx.ModelProto()
        lifted.CopyFrom(low)
        lifted.ir_version = max(first.ir_version, second.ir_version)
        first, second = (lifted, second) if low is first else (first, lifted)
    try:
        return compose.merge_models(first, second, io_map=list(io_map), outputs=list(outputs) if outputs else None)
    except ValueError as e:
        raise MergeError(f"cannot join {what}: {str(e).splitlines()[0]}") from e


def fan_out(specs: Sequence[TensorSpec], copies: Sequence[tuple[str, str]], like: onnx.ModelProto) -> onnx.ModelProto:
    """A block whose inputs are ``specs`` and whose outputs are copies (Identity) named by ``copies``
    (``(input name, copy name)``): one input can then feed several blocks, each through its own name."""
    by_name = {s.name: s for s in specs}
    nodes = [helper.make_node("Identity", [src], [dst], name=f"copy_{dst}") for src, dst in copies]
    outputs = [spec_info(by_name[src], dst) for src, dst in copies]
    return block_model("fan_out", nodes, [spec_info(s) for s in specs], outputs, like)
