"""Numerical parity between two models' outputs on the same inputs.

An output passes when every element satisfies ``|candidate - reference| <= atol + rtol * |reference|``
(numpy's allclose rule). We report the worst absolute error and the worst relative error (absolute
error over ``max(|reference|, atol)``, so near-zero references do not explode it).
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

    def json_extra(self) -> dict[str, Any]:
        return {"max_abs_error": self.max_abs, "max_rel_error": self.max_rel, "ok": self.ok}


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
        return max(self.outputs, key=lambda o: o.max_abs, default=None)

    def summary(self) -> str:
        worst = self.worst()
        if worst is None:
            return "no outputs compared"
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"parity {verdict}: max abs error {worst.max_abs:.3g} (output {worst.name!r}), "
            f"max rel error {max(o.max_rel for o in self.outputs):.3g}, "
            f"atol {self.tolerance.atol:g} rtol {self.tolerance.rtol:g}, batch {'/'.join(map(str, self.batch_sizes))}"
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
                merged.append(OutputParity(o.name, max(a.max_abs, o.max_abs), max(a.max_rel, o.max_rel), a.ok and o.ok))
        merged.extend(by_name.values())
        return ParityReport(merged, self.tolerance, tuple(sorted(set(self.batch_sizes + other.batch_sizes))))

    @classmethod
    def from_json(cls, data: dict) -> ParityReport:
        """The report back from its ``to_json()`` (a cached stage's result is JSON)."""
        outputs = [OutputParity(o["name"], o["max_abs_error"], o["max_rel_error"], o["ok"]) for o in data["outputs"]]
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
        ok = bool(np.all(diff <= tolerance.atol + tolerance.rtol * np.abs(ref64)))
        outputs.append(OutputParity(name, max_abs, max_rel, ok))
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
