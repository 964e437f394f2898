"""The nodes that compute or apply an attention mask, kept out of static quantization.

An additive attention mask holds 0 and a huge negative (-3.4e38 or -1e4): quantized, the mask
tensor's range swallows every real value, and an ``Add(scores, mask)`` quantized per tensor gets a
scale from the mask, not from the scores. Rule: a *mask input* is a graph input whose name contains
"mask"; a node is a *mask node* when every non-constant input it reads is computed from mask
inputs only (the mask's own subgraph), or when it reads such a tensor alongside activations (the
``Add`` that applies it). Both kinds are returned, to go into ``nodes_to_exclude``, so no range
taken on a mask reaches a quantized node.
"""

from __future__ import annotations

import onnx

__all__ = ["mask_nodes"]


def mask_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes computing or applying an attention mask (see the module doc), graph order."""
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    derived = {i.name for i in graph.input if "mask" in i.name.lower() and i.name not in constants}
    if not derived:
        return []
    found = []
    for node in graph.node:  # graph order is topological: producers come first
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        live = [i for i in node.input if i and i not in constants]
        if not live:
            constants.update(node.output)
            continue
        from_mask = [i in derived for i in live]
        if all(from_mask):
            derived.update(o for o in node.output if o)
        if any(from_mask) and node.name:
            found.append(node.name)
    return found
