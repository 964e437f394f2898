"""Residual sums kept out of SkipLayerNormalization where the target runs that kernel slower.

Measured (onnxruntime 1.32, CPU EP, AMD Zen 4, 1 thread): ``SkipLayerNormalization`` on
[32, 25, 384] takes 3.1 ms where ``Add`` + ``LayerNormalization`` take 0.41 ms; on int8 MiniLM at
batch 32 the 12 of them were 22% of the run. onnxruntime's session optimizer fuses every
``Add -> LayerNormalization`` into that kernel, and the onnxscript fusions emit it directly.

Rule: time both forms on the target (a [8, 64, 384] block, interleaved, median of rounds); when
SkipLayerNormalization is at least ``_SLOWER`` times slower, write each one back as
``Sum(input, skip[, bias]) -> LayerNormalization`` and every ``Add`` feeding a
``LayerNormalization`` as ``Sum``. ``Sum`` of two tensors is ``Add`` (same broadcasting), but
onnxruntime's fusion matches only ``Add``, so the fast kernels run. Outputs are unchanged.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import onnx
from onnx import helper

__all__ = ["residual_sums", "should_keep_unfused", "skip_layer_norm_slowdown"]

_SLOWER = 1.2
_HIDDEN = 384


def residual_sums(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` (a copy) with SkipLayerNormalization and Add -> LayerNormalization written as Sum +
    LayerNormalization; returns it and how many normalizations were rewritten."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type == "SkipLayerNormalization" and node.domain == "com.microsoft" \
                and not any(o in used for o in node.output[1:3]):
            nodes.extend(_unfused(node, used))
            count += 1
            continue
        if node.op_type == "Add" and node.domain in ("", "ai.onnx") and len(node.input) == 2 \
                and any(c.op_type == "LayerNormalization" for c in consumers.get(node.output[0], [])):
            node.op_type = "Sum"
            count += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out, count


def _unfused(node: onnx.NodeProto, used: set[str]) -> list[onnx.NodeProto]:
    inputs = list(node.input) + [""] * (5 - len(node.input))
    x, skip, gamma, beta, bias = inputs[:5]
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
    total = node.output[3] if len(node.output) > 3 and node.output[3] in used else f"{node.output[0]}_residual_sum"
    summed = helper.make_node("Sum", [x, skip] + ([bias] if bias else []), [total], name=f"{node.name}_sum")
    norm = helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []), [node.output[0]],
                            name=node.name, axis=-1, epsilon=epsilon)
    return [summed, norm]


def _block(fused: bool) -> onnx.ModelProto:
    shape: list[str | int] = ["N", "T", _HIDDEN]
    if fused:
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"], domain="com.microsoft",
                                  epsilon=1e-12)]
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    else:
        nodes = [helper.make_node("Sum", ["x", "s"], ["a"]),
                 helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1, epsilon=1e-12)]
        opsets = [helper.make_opsetid("", 17)]
    weights = [onnx.numpy_helper.from_array(np.ones(_HIDDEN, np.float32), "g"),
               onnx.numpy_helper.from_array(np.zeros(_HIDDEN, np.float32), "b")]
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)], weights)
    return helper.make_model(graph, opset_imports=opsets)


@functools.cache
def skip_layer_norm_slowdown(target) -> float | None:
    """How many times slower SkipLayerNormalization runs than Sum + LayerNormalization on ``target``
    (None when it cannot run there); measured once per target and process."""
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((8, 64, _HIDDEN)).astype(np.float32) for k in ("x", "s")}
    try:
        sessions = [target.session(_block(f).SerializeToString(), threads=1) for f in (True, False)]
        for s in sessions:
            s.run(None, feeds)
    except Exception:
        return None
    times: list[list[float]] = [[], []]
    for _ in range(15):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, feeds)
            times[i].append(time.perf_counter() - start)
    fused, unfused = (float(np.median(t)) for t in times)
    return fused / max(unfused, 1e-9)


def should_keep_unfused(target) -> tuple[bool, float | None]:
    """(rewrite?, the measured slowdown)."""
    slowdown = skip_layer_norm_slowdown(target)
    return slowdown is not None and slowdown >= _SLOWER, slowdown
