"""Profile-driven quantization: quantize only the op types that run faster in int8 on the target.

Rule. int8 pays only where its kernel beats the float one by more than the QuantizeLinear /
DequantizeLinear it adds; which ops those are depends on the target (PP-OCRv4's recognizer ran 1.14x
slower fully quantized: its time was not in ops int8 kernels speed up). So it is measured, per op
type (a *class*):

1. the fp32 graph is profiled per op on the target (targets.op_profile); a class's share is the
   time of its nodes (``FusedConv`` counts as Conv) over the per-op sum;
2. every quantizable class with at least ``_MIN_SHARE`` of that time is quantized alone (the same
   calibration ranges, ``op_types_to_quantize=[class]``), and all those one-class models are timed
   interleaved with fp32 in one call (Reference.time_against);
3. a class is *faster in int8* when its one-class model beats fp32 by more than ``_MIN_GAIN``: that
   model differs from fp32 only in the class's nodes and the Q/DQ around them, so the gain is theirs.
   The estimated int8/float time of the class's own nodes is reported beside it:
   ``(t_class_model - t_fp32 * (1 - share)) / (t_fp32 * share)``.

The candidate then quantizes only the faster classes; onnxruntime puts Q/DQ pairs only around
quantized nodes, so float neighbours talk in float. The per-class time shares of fp32 and of that
candidate (profiled the same way) are kept for the result: where the time went, before and after.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from onnxforge.pipeline.codec import JsonResult
from onnxforge.targets.op_profile import OpProfile

__all__ = ["OpClass", "OpClassReport", "OpShare", "class_of", "measure_classes", "time_shares"]

_MIN_SHARE = 0.03  # a class below 3% of the time cannot move the total past the timing noise
_MIN_GAIN = 0.02  # the one-class model must beat fp32 by 2% (interleaved p50s)


def class_of(op_name: str) -> str:
    """The op type a profiled kernel belongs to: onnxruntime's fusions keep the base op's class."""
    return op_name.removeprefix("Fused")


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

    @property
    def quantized(self) -> list[str]:
        return [c.op_type for c in self.classes if c.quantized]

    def describe(self) -> str:
        """One line: each measured class and its verdict."""
        parts = []
        small = [c for c in self.classes if c.speedup_alone is None]
        for c in self.classes:
            if c.speedup_alone is None:
                continue
            own = f", its nodes {c.int8_time_ratio:.2f}x their float time" if c.int8_time_ratio is not None else ""
            verdict = "int8" if c.quantized else "float"
            parts.append(f"{c.op_type} {c.fp32_share:.0%} of fp32 time, alone in int8 {c.speedup_alone:.2f}x{own}: "
                         f"{verdict}")
        if small:
            parts.append(f"{len(small)} other op type(s) under {_MIN_SHARE:.0%} of the time each stay float "
                         f"({', '.join(c.op_type for c in small[:4])}{', ...' if len(small) > 4 else ''})")
        return "; ".join(parts)


def time_shares(profile: OpProfile) -> list[OpShare]:
    """A profile's op types (fusions folded into their class), largest share first."""
    totals: dict[str, float] = {}
    for op in profile.op_types:
        totals[class_of(op.op_type)] = totals.get(class_of(op.op_type), 0.0) + op.median_us
    whole = sum(totals.values()) or 1.0
    return sorted((OpShare(op, us / whole, us) for op, us in totals.items()), key=lambda s: -s.median_us)


def measure_classes(
    scheme: str,
    fp32_profile: OpProfile,
    quantizable: Sequence[str],
    quantize_only: Callable[[list[str]], Path],
    time_models: Callable[[Mapping[str, Path]], dict[str, float]],
) -> OpClassReport:
    """Steps 1-3 of the module doc. ``quantizable``: the op types present that onnxruntime can quantize;
    ``quantize_only(op_types)``: the scheme's model with only those quantized; ``time_models(models)``:
    each model's speedup over fp32, timed interleaved in one call."""
    shares = {s.op_type: s.share for s in time_shares(fp32_profile)}
    measured = [op for op in quantizable if shares.get(op, 0.0) >= _MIN_SHARE]
    speedups = time_models({op: quantize_only([op]) for op in measured}) if measured else {}
    classes = []
    for op in sorted(quantizable, key=lambda o: -shares.get(o, 0.0)):
        share = shares.get(op, 0.0)
        speedup = speedups.get(op)
        ratio = None
        if speedup is not None and share > 0:
            ratio = max(0.0, (1.0 / speedup - (1.0 - share)) / share)
        classes.append(OpClass(op, share, speedup, ratio, speedup is not None and speedup > 1.0 + _MIN_GAIN))
    return OpClassReport(scheme, classes, time_shares(fp32_profile))
