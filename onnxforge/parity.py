"""Numerical parity between two models' outputs on the same inputs.

An output passes when its worst error is within a bound set by the output's scale:
``max |candidate - reference| <= atol + rtol * max |reference|``. The scale is the whole output's, not
each element's (numpy's allclose rule): fp32 logits of size ~1e3 differ by ~1e-4 after a correct export
because the sums that make them round at that size, and the near-zero logits beside them carry that
rounding too. We report the worst absolute error, the bound it was held to (and its scale), and the
worst relative error (absolute error over ``max(|reference|, atol)``, so near-zero references do not
explode it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxforge.errors import RecipeError
from onnxforge.pipeline import codec
from onnxforge.pipeline.codec import JsonResult

if TYPE_CHECKING:
    import onnx

__all__ = ["OutputParity", "ParityReport", "Tolerance", "compare_models", "compare_outputs"]


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class OutputParity(JsonResult):
    """One output's worst errors; saved as ``max_abs_error`` / ``max_rel_error``, the names readers
    of reports and caches already know."""

    name: str
    max_abs: float = field(metadata={"json": False})
    max_rel: float = field(metadata={"json": False})
    ok: bool = field(metadata={"json": False})
    scale: float = 0.0  # max |reference|: the output's size the bound grows with
    allowed: float = 0.0  # the bound max_abs is held to: atol + rtol * scale

    def json_extra(self) -> dict[str, Any]:
        return {"max_abs_error": self.max_abs, "max_rel_error": self.max_rel, "ok": self.ok}

    def verdict(self) -> str:
        """The worst error against its bound: ``0.00014 <= allowed 1.1``."""
        return f"{self.max_abs:.3g} {'<=' if self.ok else '>'} allowed {self.allowed:.3g}"


@dataclass(frozen=True)
class ParityReport(JsonResult):
    """Per-output parity at the given batch sizes; saved with its tolerance flattened (``atol``, ``rtol``)
    and the overall ``ok``, as ``from_json`` reads it back."""

    outputs: list[OutputParity] = field(default_factory=list)
    tolerance: Tolerance = field(default=Tolerance(), metadata={"json": False})
    batch_sizes: tuple[int, ...] = (1,)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def worst(self) -> OutputParity | None:
        """A failing output before any passing one; among those, the largest error."""
        return max(self.outputs, key=lambda o: (not o.ok, o.max_abs), default=None)

    def summary(self) -> str:
        worst = self.worst()
        if worst is None:
            return "no outputs compared"
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"parity {verdict}: max abs error {worst.verdict()} (output {worst.name!r}; "
            f"atol {self.tolerance.atol:g} + rtol {self.tolerance.rtol:g} x max|ref| {worst.scale:.3g}), "
            f"max rel error {max(o.max_rel for o in self.outputs):.3g}, batch {'/'.join(map(str, self.batch_sizes))}"
        )

    def merged(self, other: ParityReport) -> ParityReport:
        """Combine reports of the same outputs measured at other batch sizes (worst case kept)."""
        by_name = {o.name: o for o in self.outputs}
        merged = []
        for o in other.outputs:
            a = by_name.pop(o.name, None)
            if a is None:
                merged.append(o)
            else:
                # the bound of the run that came closest to (or past) its own bound
                bound = max(a, o, key=lambda p: (not p.ok, p.max_abs / p.allowed if p.allowed else p.max_abs))
                merged.append(OutputParity(o.name, max(a.max_abs, o.max_abs), max(a.max_rel, o.max_rel), a.ok and o.ok,
                                           bound.scale, bound.allowed))
        merged.extend(by_name.values())
        return ParityReport(merged, self.tolerance, tuple(sorted(set(self.batch_sizes + other.batch_sizes))))

    @classmethod
    def from_json(cls, data: dict) -> ParityReport:
        """The report back from its ``to_json()`` (a cached stage's result is JSON)."""
        outputs = [OutputParity(o["name"], o["max_abs_error"], o["max_rel_error"], o["ok"], o.get("scale", 0.0),
                                o.get("allowed", 0.0)) for o in data["outputs"]]
        return cls(outputs, Tolerance(atol=data["atol"], rtol=data["rtol"]), tuple(data["batch_sizes"]))

    def json_extra(self) -> dict[str, Any]:
        return {"ok": self.ok, "atol": self.tolerance.atol, "rtol": self.tolerance.rtol}


def _decode_parity(data: Any, where: str, base: object) -> ParityReport:
    try:
        return ParityReport.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise RecipeError(f"{where}: not a parity report ({type(e).__name__}: {e})") from e


# Decoding reads the saved spelling back (encoding stays JsonResult's), so results holding a report
# can be decoded from a cache or manifest like any other field.
codec.register_type(ParityReport, None, _decode_parity)


def compare_outputs(
    names: Sequence[str],
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    tolerance: Tolerance = Tolerance(),
    batch_size: int = 1,
) -> ParityReport:
    outputs = []
    if not (len(names) == len(reference) == len(candidate)):
        # zip would silently skip the missing ones: report every output that is not on both sides
        for name in names[min(len(reference), len(candidate)):]:
            outputs.append(OutputParity(name, float("inf"), float("inf"), False))
        if not outputs:
            outputs.append(
                OutputParity(f"(output count {len(reference)} vs {len(candidate)})", float("inf"), float("inf"), False)
            )
    for name, ref, got in zip(names, reference, candidate, strict=False):
        ref = np.asarray(ref)
        got = np.asarray(got)
        if ref.shape != got.shape:
            outputs.append(OutputParity(name, float("inf"), float("inf"), False))
            continue
        if ref.dtype.kind not in "fc":
            equal = bool(np.array_equal(ref, got))
            outputs.append(OutputParity(name, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"), equal))
            continue
        ref64 = ref.astype(np.float64)
        diff = np.abs(got.astype(np.float64) - ref64)
        if not np.all(np.isfinite(diff)):
            # NaN/Inf in either output: a failure unless both hold identical non-finite values.
            same = bool(np.array_equal(ref, got, equal_nan=True))
            outputs.append(OutputParity(name, 0.0 if same else float("inf"), 0.0 if same else float("inf"), same))
            continue
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float((diff / np.maximum(np.abs(ref64), tolerance.atol)).max()) if diff.size else 0.0
        scale = float(np.abs(ref64).max()) if diff.size else 0.0
        allowed = tolerance.atol + tolerance.rtol * scale
        outputs.append(OutputParity(name, max_abs, max_rel, max_abs <= allowed, scale, allowed))
    return ParityReport(outputs, tolerance, (batch_size,))


def compare_models(
    reference: bytes | str | onnx.ModelProto,
    candidate: bytes | str | onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    tolerance: Tolerance = Tolerance(),
) -> ParityReport:
    """Run two ONNX models (serialized bytes, paths or ModelProtos of any size) on the CPU with the same
    feeds and compare."""
    from onnxforge.targets.cpu import CpuTarget

    target = CpuTarget()
    ref_session = target.session(reference)
    cand_session = target.session(candidate)
    names = [o.name for o in ref_session.get_outputs()]
    report: ParityReport | None = None
    for feed in feeds:
        batch = int(next(iter(feed.values())).shape[0]) if feed and next(iter(feed.values())).ndim else 1
        part = compare_outputs(names, ref_session.run(None, feed), cand_session.run(None, feed), tolerance, batch)
        report = part if report is None else report.merged(part)
    return report or ParityReport([], tolerance)
