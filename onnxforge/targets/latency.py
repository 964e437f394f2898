"""Latency measurement: warm-up, then runs until a minimum count and time, summarized by
percentiles. ``compare_latency`` interleaves several sessions round by round, so that the
machine's drift (±15% run to run on a shared host) hits every model alike and ratios hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from onnxforge.pipeline.codec import JsonResult

__all__ = ["NOISY_P90", "NOISY_P99", "LatencyStats", "compare_latency", "measure_latency"]

# Spread beyond which a timing is called noisy. This shared machine drifts about ±15% run to run,
# so a quiet measurement keeps p90 within ~1.2x p50; a p99 at 2x p50 means hiccups of a whole run.
NOISY_P90 = 1.3
NOISY_P99 = 2.0


@dataclass(frozen=True)
class LatencyStats(JsonResult):
    """Milliseconds per run; ``throughput`` is samples per second at the measured batch size.

    ``samples_ms`` keeps every timed run (not in equality, repr or JSON); ``to_json`` summarizes it as a
    20-bin histogram, which the HTML report draws as the latency distribution.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    batch: int
    samples_ms: tuple[float, ...] = field(default=(), compare=False, repr=False, metadata={"json": False})

    @property
    def throughput(self) -> float:
        return 1000.0 * self.batch / self.p50_ms if self.p50_ms > 0 else float("inf")

    @classmethod
    def from_times(cls, times_s: list[float], batch: int) -> LatencyStats:
        ms = np.asarray(times_s) * 1000.0
        return cls(
            p50_ms=float(np.percentile(ms, 50)),
            p90_ms=float(np.percentile(ms, 90)),
            p99_ms=float(np.percentile(ms, 99)),
            mean_ms=float(ms.mean()),
            std_ms=float(ms.std()),
            runs=len(ms),
            batch=batch,
            samples_ms=tuple(float(t) for t in ms),
        )

    @property
    def p90_over_p50(self) -> float:
        """How far the slow tenth of runs sits above the median (1.0: every run alike)."""
        return self.p90_ms / self.p50_ms if self.p50_ms > 0 else float("inf")

    @property
    def p99_over_p50(self) -> float:
        return self.p99_ms / self.p50_ms if self.p50_ms > 0 else float("inf")

    def noise_warning(self) -> str | None:
        """A phrase when the spread says the timing is noisy (the machine was busy, or the runs are too
        short for the clock): p90 more than ``NOISY_P90`` x p50, or p99 more than ``NOISY_P99`` x p50."""
        if self.runs < 2:
            return None
        if self.p90_over_p50 > NOISY_P90 or self.p99_over_p50 > NOISY_P99:
            return (f"noisy timing: p90 is {self.p90_over_p50:.2f}x and p99 {self.p99_over_p50:.1f}x the p50 "
                    f"over {self.runs} runs; the machine was busy or the runs are too short to time alone: "
                    "trust the p50 and ratios measured side by side, re-run with more --min-seconds")
        return None

    def histogram(self, bins: int = 20) -> dict | None:
        """Counts of runs per latency bin (``edges_ms`` has one more entry than ``counts``), from the
        fastest run to p90 + 3 x (p90 - p10) at most; slower runs are counted in ``above``, so a few
        hiccups on a shared machine do not squeeze the distribution into a single bar."""
        if not self.samples_ms:
            return None
        samples = np.asarray(self.samples_ms)
        p10, p90 = np.percentile(samples, [10, 90])
        low = float(samples.min())
        high = max(min(float(samples.max()), float(p90 + 3 * (p90 - p10))), low + 1e-9)
        counts, edges = np.histogram(samples, bins=bins, range=(low, high))
        return {
            "edges_ms": [round(float(e), 6) for e in edges],
            "counts": [int(c) for c in counts],
            "above": int((samples > high).sum()),
        }

    def json_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"throughput_per_s": self.throughput, "p90_over_p50": self.p90_over_p50,
                                 "p99_over_p50": self.p99_over_p50}
        histogram = self.histogram()
        if histogram is not None:
            extra["histogram"] = histogram
        return extra


def _batch_of(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _time_one(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, dict(feeds))
    return time.perf_counter() - start


def measure_latency(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 5,
    min_runs: int = 20,
    min_seconds: float = 1.0,
    max_runs: int = 10_000,
) -> LatencyStats:
    """Time ``session.run`` on ``feeds`` after ``warmup`` runs, for at least min_runs and min_seconds."""
    for _ in range(warmup):
        session.run(None, dict(feeds))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        times.append(_time_one(session, feeds))
    return LatencyStats.from_times(times, _batch_of(feeds))


def compare_latency(
    sessions: Mapping[str, ort.InferenceSession],
    feeds: Mapping[str, Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
    *,
    warmup: int = 5,
    rounds: int = 30,
    runs_per_round: int = 3,
    min_seconds: float = 0.0,
    drop_slower_than: float | None = None,
    rivals: Collection[str] | None = None,
    min_rounds: int = 5,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, LatencyStats]:
    """Interleave the sessions: each round runs every session ``runs_per_round`` times, in turn.

    ``feeds`` is either one feed dict shared by all sessions or a dict of feeds per session name.
    ``drop_slower_than``: after ``min_rounds`` rounds, a session whose median so far is more than this
    factor above the fastest median among ``rivals`` (default: every session) stops being timed; its
    stats are from the rounds it ran. Rivals are never dropped. On a shared host p50s move ~15% run to
    run, so a factor like 1.3 drops only what is clearly slower (what no choice would keep).
    ``on_round(done, rounds)`` is called before the first round and after each one (progress).
    """
    # mypy cannot narrow the union from these checks on its values, hence the casts
    if feeds and all(name in feeds for name in sessions) and all(isinstance(v, Mapping) for v in feeds.values()):
        per_session = {name: cast("Mapping[str, np.ndarray]", feeds[name]) for name in sessions}
    else:
        per_session = {name: cast("Mapping[str, np.ndarray]", feeds) for name in sessions}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, dict(per_session[name]))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    racing = set(sessions)
    kept = set(sessions) if rivals is None else set(rivals) & set(sessions)
    start = time.perf_counter()
    done = 0
    if on_round is not None:
        on_round(done, rounds)
    while done < rounds or time.perf_counter() - start < min_seconds:
        for name, session in sessions.items():
            if name not in racing:
                continue
            for _ in range(runs_per_round):
                times[name].append(_time_one(session, per_session[name]))
        done += 1
        if drop_slower_than is not None and done >= min_rounds and kept:
            best = min(float(np.median(times[name])) for name in kept)
            racing = {name for name in racing
                      if name in kept or float(np.median(times[name])) <= best * drop_slower_than}
        if on_round is not None:
            on_round(min(done, rounds), rounds)
    return {
        name: LatencyStats.from_times(values, _batch_of(per_session[name])) for name, values in times.items()
    }
