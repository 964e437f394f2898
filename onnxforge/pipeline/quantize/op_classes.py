"""Profile-driven quantization: quantize only the op types that run faster in int8 on the target.

Rule. int8 pays only where its kernel beats the float one by more than the QuantizeLinear /
DequantizeLinear it adds; which ops those are depends on the target (PP-OCRv4's recognizer ran 1.14x
slower fully quantized: its time was not in ops int8 kernels speed up). So it is measured, per op
type, and a grouped (depthwise) Conv apart from a dense one (a *class*: on PP-OCRv4's recognizer
int8 depthwise convs bought no time and cost half the lines read):

1. the fp32 graph is profiled per op on the target (targets.op_profile); a class's share is the
   time of its nodes over the per-op sum (a profiled node is found by its name or, for onnxruntime's
   ``..._nchwc`` rewrites, its output's; ``FusedConv`` counts as Conv);
2. every quantizable class with at least ``_MIN_SHARE`` of that time is quantized alone (the same
   calibration ranges, ``op_types_to_quantize`` its op type and the nodes of the op's other classes in
   ``nodes_to_exclude``), and all those one-class models are timed interleaved with fp32 in one call
   (Reference.time_against);
3. a class is *faster in int8* when its one-class model beats fp32 by more than ``_MIN_GAIN``: that
   model differs from fp32 only in the class's nodes and the Q/DQ around them, so the gain is theirs.
   The estimated int8/float time of the class's own nodes is reported beside it:
   ``(t_class_model - t_fp32 * (1 - share)) / (t_fp32 * share)``; when that is not positive the gain
   exceeds everything the class's nodes took, which is noise, and the class stays float.

The candidate then quantizes only the faster classes; onnxruntime puts Q/DQ pairs only around
quantized nodes, so float neighbours talk in float. The per-class time shares of fp32 and of that
candidate (profiled the same way) are kept for the result: where the time went, before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxforge.pipeline.codec import JsonResult
from onnxforge.targets.op_profile import OpProfile

__all__ = ["OpClass", "OpClassReport", "OpShare", "class_of", "measure_classes", "node_classes", "selection",
           "time_shares"]

_NCHWC_SUFFIX = "_nchwc"  # onnxruntime's NCHWc rewrite names a node after its output plus this

_MIN_SHARE = 0.03  # a class below 3% of the time cannot move the total past the timing noise
_MIN_GAIN = 0.02  # the one-class model must beat fp32 by 2% (interleaved p50s)


def class_of(op_name: str) -> str:
    """The op type a profiled kernel belongs to: onnxruntime's fusions keep the base op's class."""
    return op_name.removeprefix("Fused")


def _node_class(node: onnx.NodeProto) -> str:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return f"{node.op_type} grouped" if node.op_type == "Conv" and group > 1 else node.op_type


def node_classes(model: onnx.ModelProto, op_types: Sequence[str]) -> dict[str, list[str]]:
    """Class -> the names of its nodes, for the nodes of ``op_types`` (see the module doc)."""
    classes: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in op_types:
            classes.setdefault(_node_class(node), []).append(node.name)
    return classes


def _op_type(cls: str) -> str:
    return cls.split(" ", 1)[0]


def selection(classes: Mapping[str, Sequence[str]], chosen: Sequence[str]) -> tuple[list[str], list[str]]:
    """(op types to quantize, nodes to keep in float) that quantize exactly the ``chosen`` classes."""
    op_types = sorted({_op_type(c) for c in chosen})
    excluded = [n for c, nodes in classes.items() if c not in chosen and _op_type(c) in op_types for n in nodes]
    return op_types, excluded


@dataclass(frozen=True)
class OpShare(JsonResult):
    """One op type's share of a model's per-op time on the target (µs per run: median)."""

    op_type: str
    share: float
    median_us: float


@dataclass(frozen=True)
class OpClass(JsonResult):
    """One quantizable op type measured: its share of fp32's time, the speedup of fp32 with only this
    class in int8, the estimated int8/float time of its own nodes, and whether it is quantized."""

    op_type: str
    fp32_share: float
    speedup_alone: float | None  # None: below _MIN_SHARE, not measured (kept in float)
    int8_time_ratio: float | None
    quantized: bool


@dataclass
class OpClassReport(JsonResult):
    """What the profiled scheme measured: every class, and the time shares before (fp32) and after."""

    scheme: str
    classes: list[OpClass]
    before: list[OpShare]
    after: list[OpShare] = field(default_factory=list)
    members: dict[str, list[str]] = field(default_factory=dict, metadata={"json": False})  # class -> nodes

    @property
    def quantized(self) -> list[str]:
        return [c.op_type for c in self.classes if c.quantized]

    def selection(self) -> tuple[list[str], list[str]]:
        """(op types to quantize, nodes kept in float) for the classes measured faster."""
        return selection(self.members, self.quantized)

    def describe(self) -> str:
        """One line: each measured class and its verdict."""
        parts = []
        small = [c for c in self.classes if c.speedup_alone is None]
        for c in self.classes:
            if c.speedup_alone is None:
                continue
            own = (f", its nodes {c.int8_time_ratio:.2f}x their float time" if c.int8_time_ratio is not None
                   else ", a gain beyond its share (timing noise)")
            verdict = "int8" if c.quantized else "float"
            parts.append(f"{c.op_type} {c.fp32_share:.0%} of fp32 time, alone in int8 {c.speedup_alone:.2f}x{own}: "
                         f"{verdict}")
        if small:
            parts.append(f"{len(small)} other op type(s) under {_MIN_SHARE:.0%} of the time each stay float "
                         f"({', '.join(c.op_type for c in small[:4])}{', ...' if len(small) > 4 else ''})")
        return "; ".join(parts)


def time_shares(profile: OpProfile, model: onnx.ModelProto | None = None) -> list[OpShare]:
    """A profile's classes, largest share first: op types (fusions folded in), and given the profiled
    ``model``, its grouped convs apart (nodes found by name or NCHWc output name)."""
    by_name: dict[str, onnx.NodeProto] = {}
    if model is not None:
        by_name = {o: n for n in model.graph.node for o in n.output[:1]} | {n.name: n for n in model.graph.node}
    totals: dict[str, float] = {}
    for timed in profile.nodes:
        node = by_name.get(timed.name) or by_name.get(timed.name.removesuffix(_NCHWC_SUFFIX))
        key = _node_class(node) if node is not None and node.op_type == class_of(timed.op_type) else class_of(
            timed.op_type)
        totals[key] = totals.get(key, 0.0) + timed.median_us
    whole = sum(totals.values()) or 1.0
    return sorted((OpShare(op, us / whole, us) for op, us in totals.items()), key=lambda s: -s.median_us)


def measure_classes(
    scheme: str,
    fp32_profile: OpProfile,
    model: onnx.ModelProto,
    quantizable: Sequence[str],
    quantize_only: Callable[[list[str], list[str]], Path],
    time_models: Callable[[Mapping[str, Path]], dict[str, float]],
) -> OpClassReport:
    """Steps 1-3 of the module doc on ``model`` (the profiled fp32 graph). ``quantizable``: its op types
    that onnxruntime can quantize; ``quantize_only(op_types, float_nodes)``: the scheme's model with only
    those op types quantized, less those nodes; ``time_models(models)``: each model's speedup over fp32,
    timed interleaved in one call."""
    before = time_shares(fp32_profile, model)
    shares = {s.op_type: s.share for s in before}
    members = node_classes(model, quantizable)
    measured = [c for c in members if shares.get(c, 0.0) >= _MIN_SHARE]
    speedups = time_models({c: quantize_only(*selection(members, [c])) for c in measured}) if measured else {}
    classes = []
    for op in sorted(members, key=lambda o: -shares.get(o, 0.0)):
        share = shares.get(op, 0.0)
        speedup = speedups.get(op)
        ratio = None
        if speedup is not None and share > 0:
            ratio = (1.0 / speedup - (1.0 - share)) / share
            # a gain larger than the class's whole share (MatMul at 4% "1.07x" on the recognizer) is the
            # timing noise of a small class, not a kernel: no ratio, and it stays float
            ratio = ratio if ratio > 0 else None
        faster = speedup is not None and speedup > 1.0 + _MIN_GAIN and ratio is not None
        classes.append(OpClass(op, share, speedup, ratio, faster))
    return OpClassReport(scheme, classes, before, members=members)
