"""Accuracy-aware mixed precision: return the most sensitive quantized nodes to float until the
quality gate holds.

Rule. Nodes are ranked by local SQNR (quant_error, beside this module: the error a node's own
quantization adds, measured on calibration samples), worst first; ties keep graph order, so
the order is deterministic. Returning a node to float means its quantized activation inputs
must be float too: onnxruntime's QDQ quantizer rewires *every* consumer of a quantized tensor
to the dequantized value, so a node whose input is also quantized by its producer (output
quantization) or by another consumer would still see the rounded value. Each node therefore
brings its *group*: itself plus the producer and the other quantized consumers of each of its
quantized activation inputs.

Search. Step k keeps the top-k groups in float, for k = 1, 2, 3, 4, 6, 8, 12, ... (about x1.5),
re-quantizing from the cached calibration and scoring on held-out samples, until a step meets
the gate; then k is bisected between the last failing and the first passing step (error is
assumed to shrink as more nodes go back to float). It stops at ``max_float_fraction`` of the
quantized nodes or ``max_steps`` quantizations, whichever comes first; the worst node's group
is always tried, even when it alone is larger than the fraction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxforge.errors import first_line
from onnxforge.pipeline.codec import JsonResult
from onnxforge.pipeline.quantize.quant_error import NodeError

__all__ = ["MixedPrecisionSearch", "MixedPrecisionStep", "node_groups", "rank_nodes", "search_float_nodes",
           "share_in_float"]


@dataclass(frozen=True)
class MixedPrecisionStep(JsonResult):
    """One quantization tried: the nodes kept in float (beyond the user's) and its held-out score."""

    float_nodes: tuple[str, ...]
    score: float | None
    meets_tolerance: bool
    error: str | None = None

    def json_extra(self) -> dict[str, Any]:
        return {"float_node_count": len(self.float_nodes)}


@dataclass
class MixedPrecisionSearch(JsonResult):
    """The whole search: the ranking it used and every step it measured.

    The ranking is saved as each node's name, op type and local SQNR; ``float_nodes`` and
    ``met_tolerance`` are the best step's (``json_extra``)."""

    scheme: str
    ranking: list[NodeError] = field(metadata={"json": False})
    steps: list[MixedPrecisionStep] = field(default_factory=list)

    @property
    def best(self) -> MixedPrecisionStep | None:
        """The passing step with the fewest float nodes; None when none passed."""
        passing = [s for s in self.steps if s.meets_tolerance]
        return min(passing, key=lambda s: len(s.float_nodes)) if passing else None

    def json_extra(self) -> dict[str, Any]:
        best = self.best
        return {
            "ranking": [
                {"node": e.node, "op_type": e.op_type, "local_sqnr_db": e.to_json()["local_sqnr_db"]}
                for e in self.ranking
            ],
            "float_nodes": list(best.float_nodes) if best else None,
            "met_tolerance": best is not None,
        }


def rank_nodes(errors: Sequence[NodeError]) -> list[NodeError]:
    """Worst local SQNR first; an error-free node (infinite SQNR) last; ties in graph order."""
    order = {e.node: i for i, e in enumerate(errors)}
    return sorted(errors, key=lambda e: (e.local_sqnr_db, order[e.node]))


def node_groups(qdq: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """For each quantized node name: the nodes that must go to float with it (see module doc)."""
    quantized = set(nodes)
    dq_source: dict[str, str] = {}  # DequantizeLinear output -> the float tensor its Q rounds
    q_source: dict[str, str] = {}  # QuantizeLinear output -> its float input
    for n in qdq.graph.node:
        if n.op_type == "QuantizeLinear":
            q_source[n.output[0]] = n.input[0]
    for n in qdq.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_source:
            dq_source[n.output[0]] = q_source[n.input[0]]
    producer = {o: n.name for n in qdq.graph.node for o in n.output}
    consumers: dict[str, set[str]] = {}
    for n in qdq.graph.node:
        for i in n.input:
            if i in dq_source and n.name in quantized:
                consumers.setdefault(dq_source[i], set()).add(n.name)
    groups: dict[str, tuple[str, ...]] = {}
    for n in qdq.graph.node:
        if n.name not in quantized:
            continue
        members = {n.name}
        for i in n.input:
            tensor = dq_source.get(i)
            if tensor is None:
                continue
            members |= consumers.get(tensor, set())
            if producer.get(tensor) in quantized:
                members.add(producer[tensor])
        groups[n.name] = tuple(sorted(members, key=list(nodes).index))
    return groups


def share_in_float(ranking: Sequence[NodeError], groups: dict[str, tuple[str, ...]], share: float
                   ) -> tuple[str, ...]:
    """A fixed share of the nodes kept in float, without a gate (the search's ``float_share`` knob):
    the ranking's nodes in order (worst first), each with its group, while the count stays within
    ``share`` of the ranked nodes; the worst node's group always, when ``share`` > 0. Worst first."""
    if share <= 0 or not ranking:
        return ()
    limit = share * len(ranking)
    chosen: dict[str, None] = {}
    for e in ranking:
        new = [name for name in groups.get(e.node, (e.node,)) if name not in chosen]
        if chosen and len(chosen) + len(new) > limit:
            break  # a large group next does not let a less sensitive one jump ahead of it
        chosen.update(dict.fromkeys(new))
    return tuple(chosen)


def _schedule(count: int, limit: int) -> list[int]:
    ks, k = [], 1
    while k <= min(count, limit):
        ks.append(k)
        k = k + 1 if k < 4 else int(k * 1.5)
    if ks and ks[-1] < min(count, limit):
        ks.append(min(count, limit))
    return ks


def search_float_nodes(
    scheme: str,
    ranking: Sequence[NodeError],
    groups: dict[str, tuple[str, ...]],
    evaluate: Callable[[tuple[str, ...]], tuple[float, bool]],
    *,
    max_float_fraction: float = 0.5,
    max_steps: int = 10,
) -> MixedPrecisionSearch:
    """Find a small set of float nodes that meets the gate. ``evaluate(float_nodes)`` quantizes
    with those nodes excluded and returns (held-out score, meets tolerance); it may raise."""
    search = MixedPrecisionSearch(scheme, list(ranking))
    total = len(ranking)
    if total == 0:
        return search
    limit = max(1, int(total * max_float_fraction))

    def float_nodes(k: int) -> tuple[str, ...]:
        chosen: dict[str, None] = {}
        for e in ranking[:k]:
            for name in groups.get(e.node, (e.node,)):
                chosen[name] = None
        return tuple(chosen)

    tried: dict[tuple[str, ...], MixedPrecisionStep] = {}

    def attempt(k: int) -> MixedPrecisionStep:
        nodes = float_nodes(k)
        if nodes in tried:
            return tried[nodes]
        try:
            value, ok = evaluate(nodes)
            step = MixedPrecisionStep(nodes, value, ok)
        except Exception as e:  # a failing quantization is a failed step, not a failed search
            step = MixedPrecisionStep(nodes, None, False, f"{type(e).__name__}: {first_line(e, 200)}")
        tried[nodes] = step
        search.steps.append(step)
        return step

    last_fail = 0
    first_pass = None
    for k in _schedule(total, limit):
        if len(float_nodes(k)) > limit and k > 1:
            break
        if len(search.steps) >= max_steps:
            break
        if attempt(k).meets_tolerance:
            first_pass = k
            break
        last_fail = k
    # Bisect between the last failing and the first passing k for fewer float nodes.
    while first_pass is not None and first_pass - last_fail > 1 and len(search.steps) < max_steps:
        mid = (first_pass + last_fail) // 2
        if attempt(mid).meets_tolerance:
            first_pass = mid
        else:
            last_fail = mid
    return search
