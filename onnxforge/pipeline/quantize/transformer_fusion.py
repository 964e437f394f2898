"""Transformer fusions before quantization, kept only when something fused and outputs still match.

Rule. ``onnxscript.rewriter.ort_fusions.optimize_for_ort`` rewrites dynamo exports into
onnxruntime's fused ops (MiniLM: 6 Attention, 12 SkipLayerNormalization, 6 BiasGelu, measured);
when it finds no Attention/SkipLayerNormalization pattern, ``onnxruntime.transformers.optimizer``
(which fuses TorchScript eager-attention BERTs, not dynamo ones) gets a try. The fused graph is then
made quantizable as ``QAttention`` (onnxruntime's quantizer turns an ``Attention`` into one only
when its QKV weight is one initializer, ``qkv_hidden_sizes`` is absent, and the mask comes as
``mask_index``, since QAttention has no ``attention_bias`` input and would drop it):

- a packed QKV weight computed by ``Concat`` of initializers is folded into one initializer;
- ``qkv_hidden_sizes`` with three equal sizes is dropped (the same split as its default);
- an additive ``attention_bias`` computed from one 2-D graph input M and constants becomes
  ``mask_index = Cast(M, int32)`` when, for several masks M with zeros in them, the bias is 0 at
  every key where M is 1 and <= -1e4 where M is 0, whatever the query (checked by running the graph).

With ``attention=False`` only the GELU fusions run (erf-GELU -> Gelu, + bias -> BiasGelu): the Q/K/V
projections stay MatMuls. QAttention computes its projection as one small GEMM per batch row and
head; at batch 32 three whole-batch MatMuls can be faster (measured on MiniLM: ``quantize``
times candidates at batch 1, so the search's ``quantize.fuse_attention`` knob decides at its batch).

The fused graph is kept only when its outputs match the input model's on the given samples
(relative max difference <= 1e-3; a padded batch built from variable-length samples is among them,
so a wrong mask shows); otherwise the graph is kept unfused, with a note either way.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort

from onnxforge._ort_logs import session_options

__all__ = ["FUSED_OPS", "FusionResult", "fuse_transformer", "looks_like_transformer", "padded_batch"]

FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
)
_STRUCTURAL = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization")
_PARITY_RTOL = 1e-3
_MASKED = -1e4  # an additive mask value at or below this removes a key after softmax


@dataclass
class FusionResult:
    model: onnx.ModelProto
    fused: dict[str, int]  # op -> nodes added by the fusion (empty: nothing fused, model unchanged)
    note: str
    masks_converted: int = 0  # Attention nodes whose attention_bias became mask_index


def looks_like_transformer(model: onnx.ModelProto) -> bool:
    """A Softmax and MatMuls: where the BERT fusions can apply (cheap gate before the optimizer)."""
    ops = Counter(n.op_type for n in model.graph.node)
    return ops["Softmax"] > 0 and ops["MatMul"] >= 4


def _counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.op_type in FUSED_OPS)


def fuse_transformer(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]] = (), *,
                     attention: bool = True) -> FusionResult:
    """``model`` with transformer fusions when they fused something and the outputs match on
    ``samples`` (feed dicts; none given: no parity check); otherwise ``model`` as given.
    ``attention=False``: the GELU fusions only."""
    before = _counts(model)
    if attention:
        fused_model, tool = _onnxscript_fusions(model), "onnxscript ort_fusions"
        if fused_model is None or not _gained(before, _counts(fused_model), _STRUCTURAL):
            fused_model, tool = _ort_optimizer(model), "onnxruntime.transformers optimizer"
        if fused_model is None or not _gained(before, _counts(fused_model), _STRUCTURAL):
            return FusionResult(
                model, {}, "transformer fusions found no Attention/SkipLayerNorm pattern: graph kept unfused"
            )
        fused_model, converted = _prepare_qattention(fused_model, samples)
    else:
        fused_model, tool, converted = _gelu_fusions(model), "onnxscript GELU fusions, attention unfused", 0
        if fused_model is None or not _gained(before, _counts(fused_model), FUSED_OPS):
            return FusionResult(model, {}, "transformer fusions (attention unfused) found no GELU pattern: graph "
                                           "kept unfused")
    gained = _gained(before, _counts(fused_model), FUSED_OPS)
    if samples:
        diff = _parity(model, fused_model, samples)
        if diff is None or diff > _PARITY_RTOL:
            shown = "could not run" if diff is None else f"relative difference {diff:.2e}"
            return FusionResult(
                model, {}, f"transformer fusions ({tool}) changed the outputs ({shown}): graph kept unfused"
            )
    summary = ", ".join(f"{n} {op}" for op, n in sorted(gained.items()))
    checked = f", outputs match on {len(samples)} batch(es)" if samples else ""
    masks = f"; {converted} attention mask(s) as mask_index for QAttention" if converted else ""
    return FusionResult(
        fused_model, gained, f"transformer fusions ({tool}) applied: {summary}{masks}{checked}", converted
    )


def _gained(before: Counter, after: Counter, ops: Sequence[str]) -> dict[str, int]:
    return {op: after[op] - before[op] for op in ops if after[op] > before[op]}


def _onnxscript_fusions(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fused, _ = optimize_for_ort(ir.from_proto(model))
        return ir.to_proto(fused)
    except Exception:  # the fusions are an optimisation: a failure keeps the graph
        return None


def _gelu_fusions(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        from onnxscript import optimizer
        from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
        from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
        from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu

        graph_model = ir.from_proto(model)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            common_passes.ShapeInferencePass()(graph_model)
            optimizer.optimize(graph_model)
            fuse_erfgelu(graph_model)
            fuse_gelu(graph_model)
            fuse_bias_gelu(graph_model)
            optimizer.optimize(graph_model)
        return ir.to_proto(graph_model)
    except Exception:  # the fusions are an optimisation: a failure keeps the graph
        return None


def _ort_optimizer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return None
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            optimized = optimize_model(
                onnx.ModelProto.FromString(model.SerializeToString()),
                model_type="bert",
                num_heads=0,
                hidden_size=0,
                opt_level=0,
            )
        return optimized.model
    except Exception:
        return None
    finally:
        quiet.setLevel(level)


# ----------------------------------------------------------------------------------------------
# Attention -> QAttention-ready


def _prepare_qattention(
    model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]]
) -> tuple[onnx.ModelProto, int]:
    graph_model = ir.from_proto(model)
    graph = graph_model.graph
    attentions = [n for n in graph if n.op_type == "Attention" and n.domain == "com.microsoft"]
    for node in attentions:
        _fold_packed_weight(graph, node)
        _drop_equal_qkv_sizes(node)
    common_passes.RemoveUnusedNodesPass()(graph_model)
    proto = ir.to_proto(graph_model)
    converted = _masks_to_mask_index(proto, samples)
    return proto, converted


def _fold_packed_weight(graph: ir.Graph, node: ir.Node) -> None:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is not None or weight.is_initializer():
        return
    concat = weight.producer()
    if concat is None or concat.op_type != "Concat":
        return
    parts = []
    for v in concat.inputs:
        if v is None or v.const_value is None:
            return
        parts.append(v.const_value.numpy())
    axis = concat.attributes.get_int("axis", 0)
    packed = np.concatenate(parts, axis=axis)
    value = ir.Value(
        name=f"{weight.name}_packed",
        const_value=ir.tensor(packed, name=f"{weight.name}_packed"),
        shape=ir.Shape(packed.shape),
        type=ir.TensorType(ir.DataType.from_numpy(packed.dtype)),
    )
    graph.register_initializer(value)
    node.replace_input_with(1, value)


def _drop_equal_qkv_sizes(node: ir.Node) -> None:
    sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes and len(set(sizes)) == 1 and weight is not None and weight.shape[-1] == sum(sizes):
        del node.attributes["qkv_hidden_sizes"]


def _masks_to_mask_index(model: onnx.ModelProto, samples: Sequence[Mapping[str, np.ndarray]]) -> int:
    """Rewrite (in place) each Attention's attention_bias computed from one 2-D graph input as mask_index."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input}
    by_bias: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if (
            node.op_type == "Attention"
            and node.domain == "com.microsoft"
            and len(node.input) > 5
            and node.input[5]
            and not (len(node.input) > 3 and node.input[3])
        ):
            by_bias.setdefault(node.input[5], []).append(node)
    if not by_bias or not samples:
        return 0
    converted = 0
    for bias, nodes in by_bias.items():
        source = _single_graph_input(bias, producer, constants, set(inputs))
        if source is None or not _is_key_padding_mask(model, bias, source, samples):
            continue
        index_name = f"{source}_mask_index"
        if index_name not in producer:
            cast = onnx.helper.make_node(
                "Cast", [source], [index_name], name=f"{source}_to_mask_index", to=onnx.TensorProto.INT32
            )
            graph.node.insert(0, cast)
            producer[index_name] = cast
        for node in nodes:
            node.input[3] = index_name
            node.input[5] = ""
            while node.input and not node.input[-1]:
                del node.input[-1]
            converted += 1
    if converted:
        pruned = ir.from_proto(model)
        common_passes.RemoveUnusedNodesPass()(pruned)
        model.CopyFrom(ir.to_proto(pruned))
    return converted


def _single_graph_input(tensor: str, producer: dict, constants: set[str], inputs: set[str]) -> str | None:
    """The one graph input ``tensor`` is computed from (constants aside), else None."""
    found: set[str] = set()
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in seen or not name or name in constants:
            continue
        seen.add(name)
        if name in inputs:
            found.add(name)
        elif name in producer:
            stack.extend(producer[name].input)
        else:
            return None
    return next(iter(found)) if len(found) == 1 else None


def _is_key_padding_mask(model: onnx.ModelProto, bias: str, source: str, samples) -> bool:
    """Run the graph up to ``bias`` with masks holding zeros; True when it is a key-padding mask of ``source``."""
    sample = next((s for s in samples if source in s and np.asarray(s[source]).ndim == 2), None)
    if sample is None or np.asarray(sample[source]).shape[1] < 2:
        return False
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.ValueInfoProto(name=bias))
    try:
        session = _session(probe)
    except Exception:
        return False
    needed = {i.name for i in session.get_inputs()}
    base = np.asarray(sample[source])
    rng = np.random.default_rng(0)
    for trial in range(4):
        mask = np.ones_like(base)
        length = base.shape[1]
        for row in range(mask.shape[0]):
            if trial % 2 == 0:  # padding at the end
                mask[row, rng.integers(1, length) :] = 0
            else:  # holes anywhere but the first key
                mask[row, 1:] = rng.integers(0, 2, length - 1)
        feeds = {k: np.asarray(v) for k, v in sample.items() if k in needed}
        feeds[source] = mask.astype(base.dtype)
        try:
            (value,) = session.run(None, feeds)
        except Exception:
            return False
        value = np.asarray(value, dtype=np.float64)
        if value.ndim != 4 or value.shape[0] not in (1, mask.shape[0]) or value.shape[-1] != length:
            return False
        keep = np.broadcast_to(
            mask[:, None, None, :].astype(bool), np.broadcast_shapes(value.shape, (mask.shape[0], 1, 1, length))
        )
        value = np.broadcast_to(value, keep.shape)
        if not (np.all(np.abs(value[keep]) <= 1e-6) and np.all(value[~keep] <= _MASKED)):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Parity


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = session_options()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _parity(reference: onnx.ModelProto, candidate: onnx.ModelProto, samples) -> float | None:
    """The largest max|a - b| / max(1, max|a|) over outputs and samples; None when a model cannot run."""
    try:
        a, b = _session(reference), _session(candidate)
        worst = 0.0
        for feeds in samples:
            for x, y in zip(a.run(None, dict(feeds)), b.run(None, dict(feeds)), strict=False):
                x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
                if x.shape != y.shape:
                    return None
                if x.size:
                    worst = max(worst, float(np.abs(x - y).max()) / max(1.0, float(np.abs(x).max())))
        return worst
    except Exception:
        return None


def padded_batch(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """The samples as one batch, inputs right-padded with zeros along axis 1 to the longest (a
    zero in an attention mask masks the padding); None when they differ in more than axis 1 or
    share one length (nothing to pad)."""
    if len(samples) < 2:
        return None
    names = list(samples[0])
    batch: dict[str, np.ndarray] = {}
    padded_any = False
    for name in names:
        arrays = [np.asarray(s[name]) for s in samples]
        if any(a.ndim < 2 or a.shape[0] != arrays[0].shape[0] or a.shape[2:] != arrays[0].shape[2:] for a in arrays):
            return None
        length = max(a.shape[1] for a in arrays)
        padded_any |= any(a.shape[1] != length for a in arrays)
        widths = [[(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2) for a in arrays]
        batch[name] = np.concatenate([np.pad(a, w) for a, w in zip(arrays, widths, strict=True)])
    return batch if padded_any else None
