"""Padding removed inside a transformer: the per-token layers run on the real tokens only.

A batch of sentences is padded to its longest; on all-MiniLM-L6-v2's held-out sentences at batch 32,
28% of the token positions are padding, and every projection, FFN, normalization and GELU computes
them for nothing (the mask keeps them out of attention and out of mean pooling).

Rule. A tensor is *per token* when its shape is ``[B, S, *rest]`` in two probe runs with different
``B`` and ``S`` (a padded batch and its shortest sample: ``rest`` the same in both). A node is
*token-wise* when its op computes each position from that position alone (MatMul by a constant
weight, elementwise ops with per-token or rank <= len(rest) operands, LayerNormalization on the last
axis, GELU variants, Cast), and every input and used output is per token or such an operand. With
``M`` the one 2-D integer graph input never used as Gather indices (the attention mask) and
``idx = Transpose(NonZero(M))`` (``[T, 2]``, T the real tokens), every connected group of token-wise
nodes that holds a MatMul runs on ``Unsqueeze(GatherND(x, idx), 0)`` (``[1, T, *rest]``: the rank
kept, since onnxruntime turns a 2-D MatMul + Add into a Gemm its QDQ fusion does not take, and a
static int8 MiniLM then dequantized every weight on every run, 0.3x fp32, measured) and hands its
results to the rest of the graph as ``ScatterND(zeros[B, S, *rest], idx, Squeeze(y, 0))``: attention
and pooling see the padded layout, with zeros where the padding was.

Padded positions' own outputs become zeros, so the rewrite is kept only when every graph output
matches the input graph's on the padded batch, on it with half of its first row masked, and on
each sample alone (relative max difference <= 1e-3): pooled sentence embeddings do; a
``last_hidden_state`` output (whose padded rows are whatever the model computed there) does not,
and is left as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxforge.pipeline.quantize.transformer_fusion import _parity, _session, padded_batch

__all__ = ["PackResult", "pack_tokens"]

_PARITY_RTOL = 1e-3
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Sum", "Pow", "Erf", "Tanh", "Sigmoid", "Relu", "Sqrt", "Cast",
                "Neg", "Abs", "Exp", "Max", "Min", "Clip"}
_GELU = {"BiasGelu", "FastGelu", "Gelu", "QuickGelu"}  # com.microsoft, last-axis bias only
_NORMALIZATION = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                  "SkipSimplifiedLayerNormalization"}


@dataclass
class PackResult:
    model: onnx.ModelProto
    packed: int  # token-wise nodes now run on real tokens only (0: model unchanged)
    note: str


@dataclass(frozen=True)
class _Shapes:
    """Every tensor's shape in the two probe runs, and the probes' (B, S)."""

    first: Mapping[str, tuple[int, ...]]
    second: Mapping[str, tuple[int, ...]]
    sizes: tuple[tuple[int, ...], tuple[int, ...]]
    dtypes: Mapping[str, int]  # ONNX element type of every probed tensor

    def rest(self, name: str) -> tuple[int, ...] | None:
        """``rest`` when ``name`` is ``[B, S, *rest]`` in both probes (rest non-empty), else None."""
        a, b = self.first.get(name), self.second.get(name)
        if a is None or b is None or len(a) < 3 or len(a) != len(b):
            return None
        if (a[:2], b[:2]) != self.sizes or a[2:] != b[2:]:
            return None
        return a[2:]

    def fixed(self, name: str) -> tuple[int, ...] | None:
        """The shape when it is the same in both probes (does not follow B or S), else None."""
        a, b = self.first.get(name), self.second.get(name)
        return a if a is not None and a == b else None


def pack_tokens(model: onnx.ModelProto, singles: Sequence[Mapping[str, np.ndarray]]) -> PackResult:
    """``model`` with its token-wise layers run on real tokens only when that keeps every output
    (checked on ``singles``, feed dicts of one sample each, and on them padded into one batch);
    otherwise ``model`` as given. The note says which."""
    probes = _probe_feeds(singles)
    if probes is None:
        return PackResult(model, 0, "padding removal: no samples of two or more tokens to probe the graph with")
    padded, shortest = probes
    try:
        shapes = _probe(model, padded, shortest)
    except Exception as e:  # a graph this cannot run is left as it is
        return PackResult(model, 0, f"padding removal: could not probe the graph's shapes ({type(e).__name__})")
    mask = _mask_input(model, shapes)
    if mask is None:
        return PackResult(model, 0, "padding removal: no single 2-D integer mask input found: graph kept")
    groups = _token_wise_groups(model, shapes)
    if not groups:
        return PackResult(model, 0, "padding removal: no token-wise layers with a MatMul: graph kept")
    packed_model = _rewrite(model, mask, groups, shapes)
    masked = {k: np.array(v) for k, v in padded.items()}  # padding the outputs must not show, whatever the data
    masked[mask][0, max(1, masked[mask].shape[1] // 2):] = 0
    diff = _parity(model, packed_model, [padded, masked, shortest, *singles])
    if diff is None or diff > _PARITY_RTOL:
        shown = "could not run" if diff is None else f"relative difference {diff:.2e}"
        return PackResult(model, 0, f"padding removal changed the outputs ({shown}; an output shows padded "
                                    f"positions): graph kept")
    count = sum(len(g) for g in groups)
    return PackResult(packed_model, count, f"padding removal: {count} token-wise nodes in {len(groups)} group(s) run "
                                           f"on the real tokens of mask {mask!r} only; outputs match on "
                                           f"{len(singles) + 3} batch(es)")


def _probe_feeds(singles: Sequence[Mapping[str, np.ndarray]]) -> tuple[dict, dict] | None:
    """Two feeds that differ in batch and sequence length: the samples padded into one batch and
    the shortest alone (samples of one length: the batch and one sample cut one token short)."""
    arrays = [{k: np.asarray(v) for k, v in s.items()} for s in singles]
    if len(arrays) < 2 or any(v.ndim < 2 for s in arrays for v in s.values()):
        return None
    padded = padded_batch(arrays)
    lengths = [next(iter(s.values())).shape[1] for s in arrays]
    if padded is not None:
        return padded, arrays[int(np.argmin(lengths))]
    if lengths[0] < 2:
        return None
    batch = {k: np.concatenate([s[k] for s in arrays]) for k in arrays[0]}
    return batch, {k: v[:, : lengths[0] - 1] for k, v in arrays[0].items()}


def _probe(model: onnx.ModelProto, first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> _Shapes:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    listed = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in listed:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                listed.add(name)
    names = [o.name for o in probe.graph.output]
    session = _session(probe)
    needed = {i.name for i in session.get_inputs()}
    runs, dtypes = [], {}
    for feeds in (first, second):
        arrays = {k: np.asarray(v) for k, v in feeds.items() if k in needed}
        arrays.update(zip(names, (np.asarray(v) for v in session.run(None, arrays)), strict=True))
        shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
        runs.append(shapes | {k: tuple(v.shape) for k, v in arrays.items()})
        dtypes = {k: helper.np_dtype_to_tensor_dtype(v.dtype) for k, v in arrays.items()}
    size = tuple(tuple(np.asarray(next(iter(f.values()))).shape[:2]) for f in (first, second))
    return _Shapes(runs[0], runs[1], (size[0], size[1]), dtypes)


def _mask_input(model: onnx.ModelProto, shapes: _Shapes) -> str | None:
    """The one graph input of shape [B, S], integer or bool, never Gather's indices."""
    gathered = {n.input[1] for n in model.graph.node if n.op_type == "Gather" and len(n.input) > 1}
    found = []
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        is_int = elem == onnx.TensorProto.BOOL or np.issubdtype(helper.tensor_dtype_to_np_dtype(elem), np.integer)
        a, b = shapes.first.get(value.name), shapes.second.get(value.name)
        if is_int and value.name not in gathered and (a, b) == shapes.sizes:
            found.append(value.name)
    return found[0] if len(found) == 1 else None


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                out[node.output[0]] = numpy_helper.to_array(value.t)
    return out


def _token_wise(node: onnx.NodeProto, shapes: _Shapes, constants: Mapping[str, np.ndarray], used: set[str]) -> bool:
    inputs = [i for i in node.input if i]
    token = [i for i in inputs if shapes.rest(i) is not None]
    outputs = [o for o in node.output if o and o in used]
    if not token or not outputs or any(shapes.rest(o) is None for o in outputs):
        return False
    rank = 2 + len(shapes.rest(token[0]) or ())
    op, domain = node.op_type, node.domain
    if op == "MatMul" and domain in ("", "ai.onnx"):
        weight = node.input[1]
        return node.input[0] in token and weight in constants and constants[weight].ndim == 2
    operands_ok = all(i in token or _broadcasts(i, shapes, rank) for i in inputs)
    if op in _ELEMENTWISE and domain in ("", "ai.onnx"):
        return operands_ok
    if op in _GELU and domain == "com.microsoft":
        return operands_ok
    if op in _NORMALIZATION:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        only_first = all(o not in used for o in node.output[1:] if o)
        return operands_ok and only_first and axis in (-1, rank - 1)
    return False


def _broadcasts(name: str, shapes: _Shapes, rank: int) -> bool:
    """An operand that follows neither B nor S and broadcasts over the trailing dims only."""
    shape = shapes.fixed(name)
    return shape is not None and len(shape) <= rank - 2


def _token_wise_groups(model: onnx.ModelProto, shapes: _Shapes) -> list[list[int]]:
    """Indices of token-wise nodes, grouped by the per-token tensors that join them; groups without a
    MatMul are left out (packing and unpacking would cost more than the few elementwise ops save)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    constants = _constants(model)
    nodes = list(model.graph.node)
    wise = [i for i, n in enumerate(nodes) if _token_wise(n, shapes, constants, used)]
    parent = {i: i for i in wise}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer = {o: i for i in wise for o in nodes[i].output if o}
    for i in wise:
        for name in nodes[i].input:
            j = producer.get(name)
            if j is not None and shapes.rest(name) is not None:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in wise:
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if any(nodes[i].op_type == "MatMul" for i in g)]


def _rewrite(model: onnx.ModelProto, mask: str, groups: list[list[int]], shapes: _Shapes) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = list(graph.node)
    kept = {i for g in groups for i in g}
    produced_inside = {o for i in kept for o in nodes[i].output if o}
    outside_uses = {name for i, n in enumerate(nodes) if i not in kept for name in n.input}
    outside_uses |= {o.name for o in graph.output}
    index, mask_shape = f"{mask}_token_index", f"{mask}_token_shape"
    head = [
        helper.make_node("NonZero", [mask], [f"{mask}_nonzero"], name=f"{mask}_nonzero"),
        helper.make_node("Transpose", [f"{mask}_nonzero"], [index], name=f"{mask}_token_index", perm=[1, 0]),
        helper.make_node("Shape", [mask], [mask_shape], name=f"{mask}_token_shape"),
    ]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axes_name = f"{mask}_token_axis0"
    if opset >= 13:
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes_name))
    zeros: dict[tuple[tuple[int, ...], int], str] = {}
    # ConstantOfShape([B, S, *rest]) per (rest, dtype): one per layout, shared by every scatter.
    dtypes = shapes.dtypes
    body: list[onnx.NodeProto] = []
    packed: dict[str, str] = {}  # padded tensor -> its packed twin (inputs gathered into a group)

    def zeros_for(name: str) -> str:
        rest, dtype = shapes.rest(name) or (), dtypes[name]
        key = (rest, dtype)
        if key not in zeros:
            tag = f"{mask}_zeros_{'x'.join(map(str, rest))}_{dtype}"
            rest_name = f"{tag}_rest"
            graph.initializer.append(numpy_helper.from_array(np.asarray(rest, np.int64), rest_name))
            head.append(helper.make_node("Concat", [mask_shape, rest_name], [f"{tag}_shape"], name=f"{tag}_shape",
                                         axis=0))
            head.append(helper.make_node(
                "ConstantOfShape", [f"{tag}_shape"], [tag], name=tag,
                value=helper.make_tensor("zero", dtype, [1], [0])))
            zeros[key] = tag
        return zeros[key]

    for i, node in enumerate(nodes):
        if i not in kept:
            body.append(node)
            continue
        for position, name in enumerate(node.input):
            if not name or shapes.rest(name) is None or name in produced_inside:
                continue
            if name not in packed:
                packed[name] = f"{name}_packed"
                body.append(helper.make_node("GatherND", [name, index], [f"{name}_rows"], name=f"{name}_pack"))
                body.append(_axis0("Unsqueeze", f"{name}_rows", packed[name], axes_name, opset))
            node.input[position] = packed[name]
        body.append(node)
        for position, name in enumerate(node.output):
            if name and name in outside_uses:
                node.output[position] = f"{name}_packed"
                body.append(_axis0("Squeeze", f"{name}_packed", f"{name}_packed_rows", axes_name, opset))
                body.append(helper.make_node("ScatterND", [zeros_for(name), index, f"{name}_packed_rows"], [name],
                                             name=f"{name}_unpack"))
    for i in kept:  # a group's own consumers of a tensor also unpacked for the rest read the packed one
        for position, name in enumerate(nodes[i].input):
            if name in produced_inside and name in outside_uses:
                nodes[i].input[position] = f"{name}_packed"
    del graph.node[:]
    graph.node.extend(head + body)
    # Packed tensors are [T, *rest]: say so (the quantizer reads element types from value_info, and
    # shape inference cannot see through com.microsoft ops to find them).
    twins = {o: o for i in kept for o in nodes[i].output if o} | {v: k for k, v in packed.items()}
    twins |= {f"{name}_packed": name for name in produced_inside if name in outside_uses}
    kept_info = [v for v in graph.value_info if v.name not in twins]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    for name, source in twins.items():
        if not name.endswith("_packed") and name in outside_uses:
            continue  # the scattered tensor: its original [B, S, *rest] info still holds
        graph.value_info.append(helper.make_tensor_value_info(
            name, shapes.dtypes[source], [1, f"{mask}_tokens", *(shapes.rest(source) or ())]))
    return out


def _axis0(op: str, source: str, target: str, axes_name: str, opset: int) -> onnx.NodeProto:
    """Unsqueeze/Squeeze of axis 0 (axes an input from opset 13, an attribute before)."""
    if opset >= 13:
        return helper.make_node(op, [source, axes_name], [target], name=f"{target}_{op.lower()}")
    return helper.make_node(op, [source], [target], name=f"{target}_{op.lower()}", axes=[0])
