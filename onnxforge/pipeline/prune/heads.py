"""Attention heads as prunable groups on an unfused (exported) transformer graph.

Rule: multi-head attention computes ``out = sum_h softmax(Q_h K_h' s + mask) V_h Wo_h + bo`` where head h
owns columns [h d, (h+1) d) of the Q, K and V projections (weights and biases) and rows [h d, (h+1) d)
of the output projection Wo. Removing head h removes those slices together; the other heads' scores,
softmax and context are unchanged, so the pruned block computes exactly the sum over the kept heads.
Head counts baked into Reshape shape constants (``[0, 0, H, d]``, ``[0, 0, H d]``) are rewritten;
-1 and shapes read from ``Shape`` follow by themselves. Softmax rows sum to one, so a removed head's
V bias reaches the output as the constant ``bv_h Wo_h``: it is folded into ``bo`` (exact), and the
least-squares repair (onnxforge.pipeline.prune.repair) then refits Wo and bo on calibration data.

A block is recognized from its output projection back: MatMul(const Wo) <- Reshape <- Transpose <-
MatMul(P, V) with P reached from a MatMul(Q, K) through Softmax, a mask Add, Where/Cast and scalar
Mul/Div, and Q, K and V each reached through Transpose/Reshape/scalar Mul/Div from a Reshape that
splits a projection MatMul(x, const W) [+ const bias] into [.., H, d]. A graph with fused attention
(com.microsoft ``Attention``/``MultiHeadAttention``) or an attention-like block that does not match
is refused with one line: nothing is pruned that is not understood.

Importance of head h: ``l1``/``l2``: the norm of its V columns times the norm of its Wo rows;
``activation``: the variance of its contribution ``c_h Wo_h`` to the block's output on calibration
data (its mean is the part the repair folds into the bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.errors import UsageError
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.prune.activations import batches_of_values, token_rows
from onnxforge.pipeline.prune.graph import (
    const_array,
    const_input,
    const_shape,
    layer_name,
    new_initializer,
    value_name,
)

__all__ = ["AttentionBlock", "find_attention_blocks", "has_attention", "head_scores", "heads_kept", "prune_heads"]

FUSED_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "DecoderMaskedMultiHeadAttention", "QAttention"}
_PATH = {"Transpose", "Reshape", "Mul", "Div", "Identity", "Cast"}  # ops a Q/K/V path may pass through
_SCORES_PATH = {"Softmax", "Add", "Where", "Mul", "Div", "Cast", "Identity", "Sub"}
_DEPTH = 12


@dataclass
class Projection:
    """A dense layer ``x W (+ b)`` whose output is split into heads by ``split``."""

    matmul: ir.Node
    bias: ir.Node | None  # Add(matmul output, const bias), or None
    split: ir.Node  # Reshape [.., H d] -> [.., H, d]


@dataclass
class AttentionBlock:
    q: Projection
    k: Projection
    v: Projection
    merge: ir.Node  # Reshape [.., H, d] (after Transpose) -> [.., H d]
    out: ir.Node  # MatMul(merged, const Wo)
    out_bias: ir.Node | None
    heads: int
    head_dim: int
    path_reshapes: list[ir.Node]  # other Reshapes on the Q/K/V paths (shapes read at run time)

    @property
    def name(self) -> str:
        return layer_name(self.out)


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _dynamic(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and v.const_value is None]


def _scalar_const(node: ir.Node) -> bool:
    return any(_is_const(v) and v.const_value.size == 1 for v in node.inputs)  # type: ignore[union-attr]


def _dense(node: ir.Node | None) -> bool:
    return (node is not None and node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
            and _is_const(node.inputs[1]) and len(node.inputs[1].const_value.shape) == 2)  # type: ignore[union-attr]


def _projection_of(value: ir.Value) -> tuple[ir.Node, ir.Node | None] | None:
    """(MatMul, bias Add or None) when ``value`` is ``x W`` or ``x W + b`` with constant W and b."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Add" and len(_dynamic(node)) == 1:
        inner = _dynamic(node)[0].producer()
        bias = next(v for v in node.inputs if _is_const(v))
        if _dense(inner) and bias.const_value.shape[-1] == inner.inputs[1].const_value.shape[1]:  # type: ignore[union-attr]
            return inner, node  # type: ignore[return-value]
        return None
    return (node, None) if _dense(node) else None


def _back_to_split(value: ir.Value, reshapes: list[ir.Node]) -> Projection | None:
    """Walk from a per-head tensor back to the Reshape that split a projection into heads."""
    for _ in range(_DEPTH):
        node = value.producer()
        if node is None or node.op_type not in _PATH:
            return None
        if node.op_type == "Reshape":
            found = _projection_of(node.inputs[0]) if node.inputs[0] is not None else None
            if found is not None:
                return Projection(found[0], found[1], node)
            reshapes.append(node)
            value = node.inputs[0]  # type: ignore[assignment]
            continue
        if node.op_type in ("Mul", "Div") and not (len(_dynamic(node)) == 1 and _scalar_const(node)):
            return None
        dynamic = _dynamic(node)
        if len(dynamic) != 1:
            return None
        value = dynamic[0]
    return None


def _scores_matmul(value: ir.Value, depth: int = 0) -> ir.Node | None:
    """The MatMul(Q, K') behind the attention probabilities ``value`` (through Softmax, mask, scaling)."""
    node = value.producer()
    if node is None or depth > _DEPTH:
        return None
    if node.op_type == "MatMul" and len(_dynamic(node)) == 2:
        return node
    if node.op_type not in _SCORES_PATH:
        return None
    candidates = _dynamic(node)
    if node.op_type == "Where":
        candidates = [v for v in node.inputs[1:] if v is not None and v.const_value is None]
    for candidate in candidates:
        found = _scores_matmul(candidate, depth + 1)
        if found is not None:
            return found
    return None


def _forward_to_output(value: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """(merge Reshape, output MatMul) following the context through Transpose/Reshape."""
    merge = None
    for _ in range(4):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if node.op_type == "Reshape":
            merge = node
        elif node.op_type != "Transpose":
            return (merge, node) if merge is not None and _dense(node) and uses[0].idx == 0 else None
        value = node.outputs[0]
    return None


def _shape_parts(node: ir.Node) -> list[tuple[ir.Node | None, int, np.ndarray | None]] | None:
    """The entries of a Reshape's target shape: (node holding it, input index, constant or None) per
    entry, from a constant shape or a Concat of 1-element pieces; None when it cannot be followed."""
    shape = node.inputs[1]
    if shape is None:
        return None
    if shape.const_value is not None:
        array = shape.const_value.numpy()
        return [(node, 1, array)] * len(array)
    concat = shape.producer()
    if concat is None or concat.op_type != "Concat":
        return None
    parts: list[tuple[ir.Node | None, int, np.ndarray | None]] = []
    for i, piece in enumerate(concat.inputs):
        if piece is None:
            return None
        if piece.const_value is not None:
            parts += [(concat, i, piece.const_value.numpy())] * int(piece.const_value.size)
        elif piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], int):
            parts += [(None, i, None)] * piece.shape[0]
        else:
            return None
    return parts


def _entries(node: ir.Node) -> list[int | None] | None:
    parts = _shape_parts(node)
    if parts is None:
        return None
    out: list[int | None] = []
    seen: dict[int, int] = {}
    for owner, index, array in parts:
        if array is None:
            out.append(None)
            continue
        k = seen.get(id(owner) * 1000 + index, 0)
        seen[id(owner) * 1000 + index] = k + 1
        out.append(int(array.ravel()[k]))
    return out


def _split_dims(split: ir.Node, width: int) -> tuple[int, int] | str:
    entries = _entries(split)
    if entries is None or len(entries) < 3:
        return f"Reshape {layer_name(split)}: its target shape cannot be read"
    heads, dim = entries[-2], entries[-1]
    if dim is not None and dim > 0 and width % dim == 0 and heads in (-1, width // dim):
        return width // dim, dim
    if heads is not None and heads > 0 and width % heads == 0 and dim in (-1, width // heads):
        return heads, width // heads
    return f"Reshape {layer_name(split)}: no head count and size in its shape {entries}"


def _match(out: ir.Node, context: ir.Node) -> AttentionBlock | str:
    scores = _scores_matmul(context.inputs[0])  # type: ignore[arg-type]
    if scores is None:
        return f"{layer_name(out)}: no Q K' MatMul behind the attention probabilities"
    reshapes: list[ir.Node] = []
    q = _back_to_split(scores.inputs[0], reshapes)  # type: ignore[arg-type]
    k = _back_to_split(scores.inputs[1], reshapes)  # type: ignore[arg-type]
    v = _back_to_split(context.inputs[1], reshapes)  # type: ignore[arg-type]
    if q is None or k is None or v is None:
        return f"{layer_name(out)}: Q, K or V is not a projection split into heads"
    widths = {const_shape(p.matmul, 1)[1] for p in (q, k, v)}
    width = const_shape(out, 1)[0]
    if widths != {width}:
        return f"{layer_name(out)}: Q/K/V widths {sorted(widths)} differ from the output projection's {width}"
    dims: set[tuple[int, int]] = set()
    for p in (q, k, v):
        found = _split_dims(p.split, width)
        if isinstance(found, str):
            return found
        dims.add(found)
    if len(dims) != 1:
        return f"{layer_name(out)}: Q, K and V split into different heads {sorted(dims)}"
    heads, head_dim = dims.pop()
    for node in reshapes:
        entries = _entries(node)
        if node.inputs[1] is not None and node.inputs[1].const_value is not None:
            return f"Reshape {layer_name(node)}: a constant shape inside attention {layer_name(out)}"
        if entries is not None and any(e is not None and e not in (-1, 0, 1, head_dim) for e in entries):
            return f"Reshape {layer_name(node)}: shape constants {entries} inside attention {layer_name(out)}"
    forward = _forward_to_output(context.outputs[0])
    if forward is None or forward[1] is not out:
        return f"{layer_name(out)}: the heads are not merged straight into it"
    merge = forward[0]
    merged = _entries(merge)
    if merged is None or not merged or merged[-1] not in (-1, width):
        return f"Reshape {layer_name(merge)}: merges heads into {merged}, not [.., {width}]"
    bias = None
    uses = list(out.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add" and len(_dynamic(uses[0].node)) == 1:
        constant = next(v for v in uses[0].node.inputs if _is_const(v))
        if tuple(constant.const_value.shape) == (out.inputs[1].const_value.shape[1],):  # type: ignore[union-attr]
            bias = uses[0].node
    return AttentionBlock(q, k, v, merge, out, bias, heads, head_dim, reshapes)


def find_attention_blocks(graph: ir.Graph, exclude: tuple[str, ...] = (), *, required: bool = True
                          ) -> list[AttentionBlock]:
    """Every attention block of ``graph`` whose heads can be pruned; UsageError (one line) when the graph
    holds attention that is fused or does not match (see the module doc), or none at all when ``required``
    (a model without attention has no heads to remove: the search varies --head-ratio on CNNs too)."""
    fused = sorted({n.op_type for n in graph if n.op_type in FUSED_ATTENTION})
    if fused:
        raise UsageError(f"prune-channels: --head-ratio: the graph has fused attention ({', '.join(fused)}); "
                         "heads are pruned on the unfused export",
                         hint="prune before fusing (onnxscript ort_fusions), or pass --head-ratio 0")
    blocks: list[AttentionBlock] = []
    problems: list[str] = []
    for node in graph:
        if node.op_type != "MatMul" or len(_dynamic(node)) != 2:
            continue
        forward = _forward_to_output(node.outputs[0])
        if _scores_matmul(node.inputs[0]) is None:  # type: ignore[arg-type]
            continue  # a scores MatMul (Q K'), or no attention at all
        if forward is None:
            problems.append(f"{layer_name(node)}: its context does not reach an output projection")
            continue
        if layer_name(forward[1]) in exclude or (forward[1].name or "") in exclude:
            continue
        found = _match(forward[1], node)
        if isinstance(found, str):
            problems.append(found)
        else:
            blocks.append(found)
    if problems:
        raise UsageError(f"prune-channels: --head-ratio: attention not understood: {problems[0]}",
                         hint="pass --head-ratio 0 to prune channels only")
    if not blocks and required:
        raise UsageError("prune-channels: --head-ratio: no attention heads found in this model",
                         hint="pass --head-ratio 0 (the default) for models without attention")
    return blocks


def has_attention(model: onnx.ModelProto) -> bool:
    """Whether the graph has attention (a Softmax or a fused attention op): where ``head_ratio`` is a
    search knob (``ChannelPrunePass.knobs``)."""
    ops = {node.op_type for node in model.graph.node}
    return "Softmax" in ops or bool(ops & FUSED_ATTENTION)


def heads_kept(heads: int, ratio: float) -> int:
    """Heads a block of ``heads`` keeps at ``ratio``: whole heads, at least one."""
    return max(1, heads - round(ratio * heads))


def _weight_scores(block: AttentionBlock) -> np.ndarray:
    d, h = block.head_dim, block.heads
    wv = const_array(block.v.matmul, 1).astype(np.float64).reshape(-1, h, d)
    wo = const_array(block.out, 1).astype(np.float64).reshape(h, d, -1)
    return np.sqrt((wv**2).sum(axis=(0, 2))) * np.sqrt((wo**2).sum(axis=(1, 2)))


def head_scores(blocks: list[AttentionBlock], model: onnx.ModelProto, calibration: SampleSet | None,
                activation: bool) -> dict[str, np.ndarray]:
    """Importance per head of every block (block name -> [H]); see the module doc."""
    if not blocks:
        return {}
    if not activation or calibration is None:
        return {b.name: _weight_scores(b) for b in blocks}
    names = [value_name(b.merge.outputs[0]) for b in blocks]
    sums: dict[str, list] = {b.name: [0.0, 0.0, 0] for b in blocks}  # sum c, sum c^2, rows
    for _, values, mask in batches_of_values(model, calibration, names, 8):
        for block, name in zip(blocks, names, strict=True):  # real tokens only: pad rows are never read
            x = token_rows(values[name], mask).astype(np.float64).reshape(-1, block.heads, block.head_dim)
            wo = const_array(block.out, 1).astype(np.float64).reshape(block.heads, block.head_dim, -1)
            contribution = np.einsum("rhd,hdo->rho", x, wo)
            entry = sums[block.name]
            entry[0] = entry[0] + contribution.sum(0)
            entry[1] = entry[1] + (contribution**2).sum(0)
            entry[2] += len(x)
    scores = {}
    for name, (total, square, rows) in sums.items():
        mean = total / max(rows, 1)
        scores[name] = (square / max(rows, 1) - mean**2).sum(-1)
    return scores


def _set_entry(graph: ir.Graph, node: ir.Node, position: int, value: int, counter: list[int]) -> None:
    """Rewrite entry ``position`` of Reshape ``node``'s target shape to ``value``; a Concat-built shape is
    copied first (it may be shared by layers that keep different head counts)."""
    parts = _shape_parts(node)
    if parts is None:
        raise ValueError("unreadable shape")  # never: the block matched
    owner, index, _ = parts[position]
    if owner is node:
        shape = const_array(node, 1).copy()
        shape[position] = value
        node.replace_input_with(1, new_initializer(graph, const_input(node, 1), shape, counter))
        return
    if owner is None:
        return  # read at run time
    offset = sum(1 for o, i, _ in parts[:position] if o is owner and i == index)
    piece = const_array(owner, index).copy()
    if int(piece.ravel()[offset]) in (-1, 0):
        return
    piece.ravel()[offset] = value
    copy = ir.Node(owner.domain, "Concat", list(owner.inputs), attributes=list(owner.attributes.values()),
                   name=f"{layer_name(owner)}.{layer_name(node)}")
    copy.replace_input_with(index, new_initializer(graph, const_input(owner, index), piece, counter))
    graph.insert_before(node, copy)
    node.replace_input_with(1, copy.outputs[0])


def _cut(graph: ir.Graph, node: ir.Node, index: int, axis: int, columns: np.ndarray, counter: list[int]) -> None:
    array = np.take(const_array(node, index), columns, axis=axis)
    node.replace_input_with(index, new_initializer(graph, const_input(node, index), np.ascontiguousarray(array),
                                                   counter))


def prune_heads(graph: ir.Graph, block: AttentionBlock, kept: np.ndarray, counter: list[int]) -> np.ndarray:
    """Remove the heads of ``block`` not in ``kept`` (sorted head indices); returns the kept feature
    positions of the merged context (Wo's input)."""
    d, h = block.head_dim, block.heads
    features = (kept[:, None] * d + np.arange(d)[None, :]).ravel()
    removed = np.setdiff1d(np.arange(h), kept)
    if block.out_bias is not None and block.v.bias is not None and len(removed):
        # softmax rows sum to one: a removed head's V bias reaches the output as bv_h Wo_h
        bias_index = 1 if _is_const(block.v.bias.inputs[1]) else 0
        bv = const_array(block.v.bias, bias_index).astype(np.float64).reshape(h, d)
        wo = const_array(block.out, 1).astype(np.float64).reshape(h, d, -1)
        shift = np.einsum("hd,hdo->o", bv[removed], wo[removed])
        out_index = 1 if _is_const(block.out_bias.inputs[1]) else 0
        bo = const_array(block.out_bias, out_index)
        new = (bo.astype(np.float64) + shift).astype(bo.dtype)
        block.out_bias.replace_input_with(out_index, new_initializer(graph, const_input(block.out_bias, out_index),
                                                                     new, counter))
    for projection in (block.q, block.k, block.v):
        _cut(graph, projection.matmul, 1, 1, features, counter)
        if projection.bias is not None:
            index = 1 if _is_const(projection.bias.inputs[1]) else 0
            _cut(graph, projection.bias, index, -1, features, counter)
        entries = _entries(projection.split) or []
        position = len(entries) - 2
        if entries[position] == h:
            _set_entry(graph, projection.split, position, len(kept), counter)
    _cut(graph, block.out, 1, 0, features, counter)
    merged = _entries(block.merge) or []
    if merged and merged[-1] == h * d:
        _set_entry(graph, block.merge, len(merged) - 1, len(kept) * d, counter)
    return features
