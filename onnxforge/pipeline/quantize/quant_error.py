"""Per-node quantization error of a QDQ model against its fp32 source, measured on samples.

For every node the QDQ quantizer quantized (a node fed by a DequantizeLinear), two numbers, each
taken on the node's first output:

- **local SQNR**: the node's output when each of its quantized activation inputs is the *fp32*
  model's value passed through the node's own QuantizeLinear -> DequantizeLinear (weights
  dequantized as in the quantized model), against the fp32 output. It isolates the error this
  node's quantization introduces (its input ranges, its weights), independent of upstream
  error; mixed precision ranks nodes by it.
- **end-to-end SQNR**: the node's output in the quantized model against the fp32 model's: the
  error accumulated from every quantized node upstream, i.e. where in the network accuracy goes.

With ``graph_outputs=True`` every float graph output is measured end to end too (``graph_output``
set, no local SQNR): what the network finally gives, after the output's own Q/DQ rounding and any
float tail. A per-node table without it once listed five nodes above 40 dB while the output sat at
-15.6 dB, so the tables built from it always show the outputs.

SQNR = 10 log10(sum x^2 / sum (x - x_q)^2) in dB over all measured samples (higher is better);
relative error = ||x - x_q|| / ||x||. Both models run with graph optimizations off, so the
quantized one is evaluated as the QDQ graph says (fake quantization), node by node. The sums
are accumulated batch by batch (onnxforge.pipeline.compare's accumulator, the one ``onnxforge
compare`` uses): memory holds one batch's activations, not the data set's. Under a memory limit the
nodes are measured in shares too, one share per pass over the data (balanced by the size of their
outputs): the sessions then return that share's tensors, and the local model is cut to what the
share's nodes read. Every number is the one a single pass gives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxforge._ort_logs import session_options
from onnxforge.pipeline.codec import JsonResult
from onnxforge.pipeline.compare import ErrorAccumulator, with_outputs
from onnxforge.pipeline.quantize.memory_plan import balanced_shares

__all__ = ["NodeError", "layer_errors", "measure_node_errors", "output_errors", "quantized_nodes"]

_QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime's name for a graph output's pre-Q tensor
_REF_SUFFIX = "__onnxforge_fp32"


@dataclass(frozen=True)
class NodeError(JsonResult):
    """One quantized node's error; ``output`` is the fp32 model's name of the tensor measured.

    The two SQNRs are saved rounded to 3 decimals, an infinite one (an error-free tensor) as null
    (``json_extra``); the fields keep the exact values the ranking sorts on."""

    node: str
    op_type: str
    output: str
    local_sqnr_db: float = field(metadata={"json": False})
    sqnr_db: float = field(metadata={"json": False})
    relative_error: float
    graph_output: bool = False  # a graph output measured end to end (node: its fp32 producer; local: NaN)

    def json_extra(self) -> dict[str, Any]:
        return {"local_sqnr_db": _finite(self.local_sqnr_db), "sqnr_db": _finite(self.sqnr_db)}


def _finite(value: float) -> float | None:
    # JSON has no Infinity: an error-free tensor (identical outputs) is reported as null, as is a
    # graph output's local SQNR (not a quantized node of its own: NaN).
    return round(value, 3) if math.isfinite(value) else None


def layer_errors(errors: Sequence[NodeError]) -> list[NodeError]:
    """The quantized nodes' entries of ``errors`` (the graph outputs' left out): what a ranking reads."""
    return [e for e in errors if not e.graph_output]


def output_errors(errors: Sequence[NodeError]) -> list[NodeError]:
    """The graph outputs' entries of ``errors``."""
    return [e for e in errors if e.graph_output]


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class _GraphOutput:
    name: str
    node: str  # the fp32 node that gives it
    op_type: str


def _graph_outputs(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> list[_GraphOutput]:
    """The float outputs both graphs give under one name, with the fp32 node that produces each."""
    in_qdq = {o.name for o in qdq.graph.output}
    producer = {o: n for n in fp32.graph.node for o in n.output}
    found = []
    for out in fp32.graph.output:
        if out.name not in in_qdq or out.type.tensor_type.elem_type not in _FLOAT_TYPES:
            continue
        node = producer.get(out.name)
        found.append(_GraphOutput(out.name, (node.name or out.name) if node else out.name,
                                  node.op_type if node else "input"))
    return found


@dataclass(frozen=True)
class _QuantizedNode:
    name: str
    op_type: str
    qdq_output: str  # the node's first output as named in the QDQ model
    fp32_output: str  # the same tensor in the fp32 model


def _fp32_name(name: str) -> str:
    return name[: -len(_QUANT_INPUT_SUFFIX)] if name.endswith(_QUANT_INPUT_SUFFIX) else name


def quantized_nodes(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> list[_QuantizedNode]:
    """Nodes of ``qdq`` (in graph order) with a DequantizeLinear input and a counterpart in ``fp32``.

    When the quantizer folded a following Relu/Clip into the output rounding (the node's output
    then carries the activation's name), the node is measured after its output's Q/DQ pair,
    which is where the fp32 activation's value is reproduced.
    """
    dq_outputs = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_of = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    fp32_nodes = {n.name: n for n in fp32.graph.node if n.name}
    fp32_tensors = {o for n in fp32.graph.node for o in n.output}
    found = []
    for node in qdq.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not node.output:
            continue
        if not any(i in dq_outputs for i in node.input):
            continue
        original = fp32_nodes.get(node.name)
        if original is None:
            continue
        raw = node.output[0]
        if _fp32_name(raw) == original.output[0]:
            found.append(_QuantizedNode(node.name, node.op_type, raw, original.output[0]))
        elif _fp32_name(raw) in fp32_tensors and raw in q_of and q_of[raw] in dq_of:
            found.append(_QuantizedNode(node.name, node.op_type, dq_of[q_of[raw]], _fp32_name(raw)))
    return found


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = session_options()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False  # memory returns after each batch (these sessions are not timed)
    options.enable_mem_pattern = False
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _local_model(qdq: onnx.ModelProto, graph_inputs: set[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``qdq`` with every QuantizeLinear of an intermediate activation fed from a new graph input.

    Returns the model and {new input name: fp32 tensor name to feed it}.
    """
    local = onnx.ModelProto()
    local.CopyFrom(qdq)
    initializers = {i.name: i for i in local.graph.initializer}
    feeds: dict[str, str] = {}
    for node in local.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        source = node.input[0]
        if source in initializers or source in graph_inputs:
            continue
        fed = _fp32_name(source) + _REF_SUFFIX
        if fed not in feeds:
            scale = initializers.get(node.input[1])
            elem = scale.data_type if scale is not None else onnx.TensorProto.FLOAT
            local.graph.input.append(helper.make_tensor_value_info(fed, elem, None))
            feeds[fed] = _fp32_name(source)
        node.input[0] = fed
    return local, feeds


def _cut(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """``model`` with only the nodes ``outputs`` depend on, the graph inputs they read, and ``outputs``."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    needed_nodes: set[int] = set()
    reached: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in reached:
            continue
        reached.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in needed_nodes:
            needed_nodes.add(id(node))
            stack.extend(i for i in [*node.input, *_read_by_bodies(node)] if i)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(n for n in model.graph.node if id(n) in needed_nodes)
    del cut.graph.input[:]
    cut.graph.input.extend(i for i in model.graph.input if i.name in reached)
    return with_outputs(_without_outputs(cut), outputs)


def _read_by_bodies(node: onnx.NodeProto) -> list[str]:
    """Names an If/Loop/Scan body reads (from the outer graph among them)."""
    names = []
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in graph.node:
                names.extend([*inner.input, *_read_by_bodies(inner)])
    return names


def _without_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    del model.graph.output[:]
    return model


def measure_node_errors(
    fp32_path: str | os.PathLike,
    qdq_path: str | os.PathLike,
    batches: Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable[Mapping[str, np.ndarray]]],
    *,
    passes: int = 1,
    output_sizes: Mapping[str, int] | None = None,
    graph_outputs: bool = False,
) -> list[NodeError]:
    """Local and end-to-end error of each quantized node of ``qdq_path`` over ``batches`` of inputs.

    ``qdq_path`` must be a QDQ-format quantization of ``fp32_path`` (node names kept, as
    onnxruntime's QDQ quantizer does). Returns nodes in graph order; empty when none is quantized.
    ``graph_outputs``: then the float graph outputs follow, end to end (``graph_output`` set).
    ``passes`` > 1 measures a share of the nodes per pass over the data (``batches`` is then a
    callable that gives them again), balanced by ``output_sizes`` (bytes of the fp32 tensors per sample).
    """
    if passes > 1 and not callable(batches):
        raise TypeError("several passes over the nodes need a callable that gives the batches again")
    fp32 = onnx.load(str(fp32_path))
    qdq = onnx.load(str(qdq_path))
    nodes = quantized_nodes(qdq, fp32)
    if not nodes:
        return []
    graph_inputs = {i.name for i in qdq.graph.input}
    local_model, local_feeds = _local_model(qdq, graph_inputs)
    if passes == 1:
        shares = [nodes]
    else:
        names = balanced_shares([n.fp32_output for n in nodes], passes, output_sizes or {})
        shares = [[n for n in nodes if n.fp32_output in share] for share in names]
    outputs = _graph_outputs(qdq, fp32) if graph_outputs else []
    errors: dict[str, NodeError] = {}
    ends: list[NodeError] = []
    for share in shares:
        if share:
            again = batches() if callable(batches) else batches
            measured, ends_measured = _measure(fp32, qdq, local_model, local_feeds, share, again, cut=passes > 1,
                                               outputs=outputs if not ends else [])
            errors.update(measured)
            ends += ends_measured
    return [errors[n.name] for n in nodes] + ends


def _measure(
    fp32: onnx.ModelProto,
    qdq: onnx.ModelProto,
    local_model: onnx.ModelProto,
    local_feeds: Mapping[str, str],
    nodes: Sequence[_QuantizedNode],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    cut: bool,
    outputs: Sequence[_GraphOutput] = (),
) -> tuple[dict[str, NodeError], list[NodeError]]:
    """The errors of ``nodes`` (and, end to end, of ``outputs``) in one pass over ``batches``; ``cut``: the
    local model keeps only what the nodes read."""
    measured = [n.qdq_output for n in nodes]
    local_model = _cut(local_model, measured) if cut else with_outputs(local_model, measured)
    local_inputs_read = {i.name for i in local_model.graph.input}
    local_feeds = {fed: name for fed, name in local_feeds.items() if fed in local_inputs_read}
    ends = [o.name for o in outputs]
    fp32_names = list(dict.fromkeys([n.fp32_output for n in nodes] + list(local_feeds.values()) + ends))
    fp32_session = _session(with_outputs(fp32, fp32_names))
    qdq_session = _session(with_outputs(qdq, list(dict.fromkeys(measured + ends))))
    local_session = _session(local_model)
    fp32_index = {o.name: i for i, o in enumerate(fp32_session.get_outputs())}
    qdq_index = {o.name: i for i, o in enumerate(qdq_session.get_outputs())}
    local_index = {o.name: i for i, o in enumerate(local_session.get_outputs())}
    input_names = [i.name for i in fp32_session.get_inputs()]
    local_graph_inputs = [name for name in input_names if name in local_inputs_read]

    local = {n.name: ErrorAccumulator() for n in nodes}
    end_to_end = {n.name: ErrorAccumulator() for n in nodes}
    at_outputs = {name: ErrorAccumulator() for name in ends}
    for batch in batches:
        feeds = {k: batch[k] for k in input_names}
        reference = fp32_session.run(None, feeds)
        quantized = qdq_session.run(None, feeds)
        local_inputs = {k: feeds[k] for k in local_graph_inputs}
        local_inputs |= {fed: reference[fp32_index[name]] for fed, name in local_feeds.items()}
        local_out = local_session.run(None, local_inputs)
        for n in nodes:
            ref = reference[fp32_index[n.fp32_output]]
            end_to_end[n.name].add(ref, quantized[qdq_index[n.qdq_output]])
            local[n.name].add(ref, local_out[local_index[n.qdq_output]])
        for name in ends:
            at_outputs[name].add(reference[fp32_index[name]], quantized[qdq_index[name]])
        del reference, quantized, local_out
    graph_ends = [
        NodeError(node=o.node, op_type=o.op_type, output=o.name, local_sqnr_db=math.nan,
                  sqnr_db=at_outputs[o.name].sqnr_db(), relative_error=at_outputs[o.name].relative_error(),
                  graph_output=True)
        for o in outputs
    ]
    return {
        n.name: NodeError(
            node=n.name,
            op_type=n.op_type,
            output=n.fp32_output,
            local_sqnr_db=local[n.name].sqnr_db(),
            sqnr_db=end_to_end[n.name].sqnr_db(),
            relative_error=end_to_end[n.name].relative_error(),
        )
        for n in nodes
    }, graph_ends
