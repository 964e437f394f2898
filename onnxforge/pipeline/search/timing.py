"""How timings enter the search, so that noise does not steer it.

A single interleaved timing of a small model on a CPU moves by several percent from one call to the
next (thread placement, caches, the session's memory); a sampler told those raw numbers draws its next
plans from the noise, and the same command on the same data ends at different bests. So:

- **A trial's ratio** is the median of ``repeats`` interleaved calls (``Reference.time_against``: the
  trial and the input model in turn, each call's ratio against the input's p50 in that same call), and
  ``ratio_spread`` says how far those calls disagreed ((max - min) / median).
- **The sampler** is steered, by default, by what does not move between runs: the quality loss and the
  trial's ``cost_estimate``, a latency model counted on the built graph relative to the input's (float
  MACs, int8 MACs at the target's int8 speedup, and a fixed cost per kernel launched: at batch 1 a small
  model's time is mostly launches, and an int8 model is faster only by its MACs, not by its 4x smaller
  file; an estimate from file size told the sampler quantization alone was 4-400x faster and it spent
  its trials on quantization schemes instead of structure). The plan sequence is then a function of
  the seed and the data, whatever the timings; the front and the choice are still drawn from timings,
  never from the estimate. With a ``resolution``
  the sampler is told the median ratio on a ladder of steps of that size instead (``steer_ratio``):
  it learns what only timing shows (a scheme the target runs slowly), at the price of plans that
  change when a ratio's noise crosses a rung.
- **The final choice** re-times the front together (``separate``): the fastest within budget and its
  runner-up are re-timed with twice the rounds until no call of the one overlaps the other's, or
  the rounds or the time budget run out (then the pick is reported as within noise: two equal models
  never separate, and doubling the rounds of a 100 ms encoder ran for over 30 minutes). At least five
  calls each: with fewer, two equal models would look apart too often.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnxforge.model_cost import ComputeCost

__all__ = ["cost_estimate", "median_timing", "separate", "steer_ratio"]

Timer = Callable[[Mapping[str, str], int], dict[str, dict[str, float]]]


def median_timing(models: Mapping[str, Any], timer: Timer, rounds: int, repeats: int) -> dict[str, dict[str, float]]:
    """Each model's median over ``repeats`` calls of ``timer(models, rounds)`` (one interleaved call each):
    ``ratio``, ``reference_ms``, ``model_ms`` (medians), ``ratio_low`` / ``ratio_high`` (the calls'
    extremes) and ``ratio_spread`` ((high - low) / median)."""
    calls = [timer(models, rounds) for _ in range(max(1, repeats))]
    out = {}
    for name in models:
        ratios = [c[name]["ratio"] for c in calls]
        ratio = statistics.median(ratios)
        out[name] = {"reference_ms": statistics.median(c[name]["reference_ms"] for c in calls),
                     "model_ms": statistics.median(c[name]["model_ms"] for c in calls),
                     "ratio": ratio, "ratio_low": min(ratios), "ratio_high": max(ratios),
                     "ratio_spread": (max(ratios) - min(ratios)) / ratio if ratio > 0 else 0.0}
    return out


def cost_estimate(size: int, cost: ComputeCost | None, reference_size: int, reference_cost: ComputeCost | None, *,
                  kernel_macs: float, int8_speedup: float) -> float:
    """The estimated latency ratio to the input model, for steering only: ``float MACs + integer MACs /
    int8_speedup + kernels * kernel_macs`` over the same for the input (the target's two constants:
    ``Target.kernel_overhead_macs``, ``Target.int8_mac_speedup``); the size ratio when MACs could not
    be counted."""
    def latency(c: ComputeCost) -> float:
        return c.float_macs + c.integer_macs / int8_speedup + c.kernels * kernel_macs

    if cost is None or reference_cost is None or latency(reference_cost) <= 0:
        return round(size / reference_size if reference_size > 0 else 1.0, 6)
    return round(latency(cost) / latency(reference_cost), 6)


def steer_ratio(ratio: float, resolution: float) -> float:
    """``ratio`` on the ladder ``(1 + resolution) ** k`` (the nearest rung in log space): what the sampler
    is told. ``resolution`` 0 tells it the ratio as measured."""
    if resolution <= 0 or ratio <= 0:
        return ratio
    step = math.log1p(resolution)
    return round(math.exp(round(math.log(ratio) / step) * step), 6)


SEPARATE_BUDGET_S = 120.0  # re-timing two contenders again stops once the next doubling would pass this


def separate(records: list[dict[str, Any]], timer: Timer, rounds: int, repeats: int, *,
             max_doublings: int = 3, budget_s: float = SEPARATE_BUDGET_S,
             clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Re-time ``records`` (trial records with ``path`` resolved by the caller into ``model``) together,
    then the fastest two within budget again with doubled rounds until they separate.

    Updates each record's ``ratio``, ``reference_ms``, ``model_ms``, ``speedup`` and ``ratio_spread``
    (keeping the trial's own ratio as ``trial_ratio``) and returns how the choice was settled:
    ``{"rounds": ..., "separated": bool, "contenders": [numbers]}``. Two models are separated when no
    call of the one overlaps the calls of the other (the slower one's fastest call is slower than the
    faster one's slowest). A doubling whose time, extrapolated from the calls so far, would take the
    re-timing past ``budget_s`` is not started (``"stopped": "time budget"``)."""
    bounds: dict[Any, tuple[float, float]] = {}
    start = clock()
    per_model_round = [0.0]  # seconds one model's round took in the last call

    def apply(chosen: list[dict[str, Any]], rounds: int) -> None:
        began = clock()
        timed = median_timing({str(r["number"]): r["model"] for r in chosen}, timer, rounds, max(5, repeats))
        per_model_round[0] = (clock() - began) / max(1, len(chosen) * rounds)
        for r in chosen:
            t = timed[str(r["number"])]
            bounds[r["number"]] = (t["ratio_low"], t["ratio_high"])
            r.setdefault("trial_ratio", r.get("ratio"))
            r.update(ratio=t["ratio"], reference_ms=t["reference_ms"], model_ms=t["model_ms"],
                     speedup=1.0 / t["ratio"], ratio_spread=t["ratio_spread"])

    apply(records, rounds)
    settled: dict[str, Any] = {"rounds": rounds, "separated": True, "contenders": []}
    for _ in range(max_doublings + 1):
        within = sorted((r for r in records if r.get("within_budget")), key=lambda r: r["ratio"])
        if len(within) < 2:
            return settled
        first, second = within[:2]
        settled["contenders"] = [first["number"], second["number"]]
        if bounds[first["number"]][1] < bounds[second["number"]][0]:
            settled["separated"] = True
            return settled
        settled["separated"] = False
        if settled["rounds"] >= rounds * 2 ** max_doublings:
            break
        if clock() - start + per_model_round[0] * 2 * settled["rounds"] * 2 > budget_s:
            settled["stopped"] = "time budget"
            break
        settled["rounds"] *= 2
        apply([first, second], settled["rounds"])
    return settled
