"""Where each stage's time goes: per-op-type kernel time of a run's input and every stage output, for
the run report's "time per op type, before and after each stage" chart.

Each model is profiled with onnxruntime's profiler (``targets/op_profile.py``) on the same feeds the
run's timing uses, at batch 1 and 1 thread, for a few runs (``RUNS`` after ``WARMUP``): enough for
shares, which is all this answers — the latency column stays the interleaved timing's. The op types
are those of the graph onnxruntime runs after its own fusions (``FusedConv``, ``QLinearConv``).
A profile is kept as a cache record (cache.recorded) keyed by the model's fingerprint (its file's sha256,
with its external data), the feeds, the target, the tool versions and onnxforge's code, so a re-run with
unchanged stages profiles nothing again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxforge.pipeline.cache import StageCache, code_fingerprint, recorded, stage_key
from onnxforge.pipeline.codec import JsonResult
from onnxforge.pipeline.evaluations import feeds_fingerprint, model_fingerprint
from onnxforge.pipeline.manifest import tool_versions
from onnxforge.targets.base import Target
from onnxforge.targets.op_profile import OpProfileConfig, profile_ops

__all__ = ["RUNS", "WARMUP", "OpTime", "op_time"]

WARMUP = 3
RUNS = 12
_RECORD_KIND = "op-time"


@dataclass(frozen=True)
class OpTime(JsonResult):
    """Median kernel time per run of each op type (µs, the profiled session), its sum, and how many
    profiled runs gave it. ``per_op_us`` is ordered slowest first."""

    per_op_us: dict[str, float]
    op_sum_us: float
    runs: int
    profiler_overhead: float  # profiled p50 over plain p50: the profiled times are shares, not latencies

    @classmethod
    def from_json(cls, data: Mapping) -> OpTime:
        return cls(per_op_us={str(k): float(v) for k, v in data["per_op_us"].items()},
                   op_sum_us=float(data["op_sum_us"]), runs=int(data["runs"]),
                   profiler_overhead=float(data["profiler_overhead"]))


def op_time(path: Path, feeds: Mapping[str, np.ndarray], target: Target, cache: StageCache | None) -> OpTime:
    """The per-op-type time of ``path`` on ``target`` fed ``feeds`` (batch 1, 1 thread), from ``cache``
    when a run already profiled this very model on these feeds."""
    key = stage_key({"model": model_fingerprint(path), "feeds": feeds_fingerprint(feeds), "target": target.name,
                     "runs": [WARMUP, RUNS], "versions": tool_versions(), "code": code_fingerprint()})

    def measure() -> OpTime:
        profile = profile_ops(path, feeds, OpProfileConfig(target=target, threads=1, warmup=WARMUP, runs=RUNS))
        return OpTime(per_op_us={o.op_type: o.median_us for o in profile.op_types},
                      op_sum_us=sum(o.median_us for o in profile.op_types), runs=profile.runs,
                      profiler_overhead=profile.profiler_overhead)

    return recorded(cache, _RECORD_KIND, key, measure, decode=OpTime.from_json, encode=OpTime.to_json)[0]
