"""Candidate timings recorded in the stage cache, so that a re-run of the same quantize keeps the same
scheme and writes the same bytes.

The kept scheme is the fastest within tolerance (select._fastest): a measurement. p50s move ±15% run
to run on a shared host; candidates within 5% of the fastest count as tied and the earliest in the
target's order wins, but a candidate near the band's edge still falls on either side of it (about 1
run in 8 under load, issue 17), and the output changes with it. So the timings of a set of candidates
are recorded, keyed by what was timed: the sha256 of every model, the feeds, the target, threads and
rounds, the machine, onnxruntime's version and onnxforge's code. Calibration and quantization are
deterministic given their inputs (tests/reliability/test_determinism.py), so a re-run builds the same
candidates, finds their timings and makes the same choice; anything that changes a candidate's bytes
changes the key and is timed afresh. Without a cache (``--no-cache``) every run times. The record is
kept as every measurement the cache keeps is (cache.recorded), like the run report's per-op profiles.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxforge.pipeline.evaluations import feeds_fingerprint, model_fingerprint
from onnxforge.targets.latency import LatencyStats

__all__ = ["recorded_timings", "timing_key"]

KIND = "quantize-timings"


def timing_key(models: Mapping[str, Path], feeds: Mapping[str, np.ndarray], *, target: str, threads: int,
               rounds: int) -> str:
    """What a timing of ``models`` (label -> file) on ``feeds`` depends on, as one sha256."""
    from onnxforge.pipeline.cache import code_fingerprint, stage_key

    return stage_key({
        "models": {label: model_fingerprint(path) for label, path in models.items()},
        "feeds": feeds_fingerprint(feeds),
        "target": target, "threads": threads, "rounds": rounds,
        "machine": [platform.node(), platform.machine(), os.cpu_count()],
        "onnxruntime": ort.__version__,
        "code": code_fingerprint(),
    })


def recorded_timings(
    cache: Any, key: str, labels: list[str], measure: Callable[[], dict[str, LatencyStats]]
) -> tuple[dict[str, LatencyStats], bool]:
    """(timings by label, whether they were recorded earlier): the record under ``key`` in ``cache``
    (a StageCache, or None) when it holds every label, else ``measure()``, which is then recorded."""
    from onnxforge.pipeline.cache import recorded

    def decode(data: Any) -> dict[str, LatencyStats]:
        if not isinstance(data, dict) or set(data) != set(labels):
            raise ValueError("a record of other candidates")
        return {label: _stats(data[label]) for label in labels}

    return recorded(cache, KIND, key, measure, decode=decode,
                    encode=lambda timings: {label: dataclasses.asdict(stats) for label, stats in timings.items()})


def _stats(values: dict) -> LatencyStats:
    return LatencyStats(**{**values, "samples_ms": tuple(values.get("samples_ms", ()))})
