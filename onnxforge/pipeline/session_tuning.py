"""Session tuning: which onnxruntime session options (``targets/session_settings.py``) run one model
faster than onnxruntime's defaults, measured on this machine with the model's own feeds.

The rule: every candidate setting (one knob changed at a time: graph optimization level, NCHWc off,
fewer intra-op threads within the user's thread budget, memory pattern off, arena off) is timed
interleaved with the defaults in one ``Reference.time_against`` call, beside a second session of the
defaults (an A/A control: its "speedup" over the first is the run's noise). The bar in each run is
``min_gain`` (3%) faster, or twice the control's distance from 1 when that is larger. Those over the
bar go to a second, fresh interleaved call; a setting is kept only when it clears the bar both times.
(On this 2-core box under load ~11, the defaults timed against themselves ranged 0.95x-1.19x from run
to run: a fixed 3% bar alone would let that noise through.) The kept knobs are
then combined and the combination confirmed the same way, twice; it is chosen when it holds and
beats the best single setting's worse-of-two speedup, else that single setting is. Nothing kept: the
defaults stay and nothing is written. On a shared machine drifting ±15% run to run only the ratios
of interleaved runs are used.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxforge.pipeline.codec import JsonResult
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.reference import Reference
from onnxforge.targets.session_settings import (
    GraphLevel,
    SessionSettings,
    is_ours,
    settings_path,
    write_settings,
)

__all__ = ["MIN_GAIN", "SessionTuning", "SettingTrial", "candidate_settings", "tune_session", "tune_session_file"]

MIN_GAIN = 0.03  # a setting must be this much faster (p50 ratio) in two interleaved runs to be kept
CONTROL = "onnxruntime defaults (A/A control)"

# label -> settings in, label -> speedup over the baseline (its p50 over the label's) out
Measure = Callable[[Mapping[str, SessionSettings]], dict[str, float]]


@dataclass(frozen=True)
class SettingTrial(JsonResult):
    """One candidate: its label, its changes from the defaults, and its speedup in each interleaved run."""

    label: str
    settings: dict[str, Any]
    speedups: tuple[float, ...]
    kept: bool


@dataclass(frozen=True)
class SessionTuning(JsonResult):
    """What was tried and what was chosen (``chosen`` is the defaults when nothing held up)."""

    chosen: SessionSettings = field(metadata={"json": False})
    speedup: float | None  # the chosen settings' worse speedup of its two confirming runs; None: defaults
    trials: tuple[SettingTrial, ...]
    min_gain: float
    threads: int | None  # the thread budget the candidates stayed within (None: onnxruntime's default)
    controls: tuple[float, ...] = ()  # per interleaved run, the defaults' speedup over themselves (the noise)
    written: str | None = None  # the .session.json written (None: nothing was faster, nothing written)

    @property
    def improved(self) -> bool:
        return self.chosen != self.baseline

    @property
    def baseline(self) -> SessionSettings:
        return SessionSettings(intra_op_threads=self.threads)

    def json_extra(self) -> dict[str, Any]:
        return {"chosen": self.chosen.changes(), "summary": self.summary()}

    def summary(self) -> str:
        if not self.improved or self.speedup is None:
            noise = max((abs(c - 1) for c in self.controls), default=0.0)
            bar = max(self.min_gain, 2 * noise)
            why = f" (twice the defaults' own noise, {noise:.0%})" if bar > self.min_gain else ""
            return (f"onnxruntime's defaults kept: no setting of {len(self.trials)} tried was faster by more than "
                    f"{bar:.0%} twice{why}")
        return f"{self.chosen.label}: {self.speedup:.2f}x the defaults' speed (confirmed twice)"


def _has_conv(model: onnx.ModelProto) -> bool:
    return any(node.op_type in ("Conv", "ConvTranspose") for node in model.graph.node)


def candidate_settings(model: onnx.ModelProto, threads: int | None = None) -> dict[str, SessionSettings]:
    """One knob changed at a time from the baseline (onnxruntime's defaults, ``threads`` intra-op threads):
    what may be faster for ``model``. Thread counts stay within ``threads`` (default: this machine's cores)."""
    base = SessionSettings(intra_op_threads=threads)
    options: dict[str, SessionSettings] = {
        "graph basic": dataclasses.replace(base, graph_optimization=GraphLevel.BASIC),
        "graph extended": dataclasses.replace(base, graph_optimization=GraphLevel.EXTENDED),
        "no memory pattern": dataclasses.replace(base, mem_pattern=False),
        "no arena": dataclasses.replace(base, cpu_mem_arena=False),
    }
    if _has_conv(model):  # NCHWc rewrites convolutions only
        options["no nchwc"] = dataclasses.replace(base, nchwc=False)
    budget = threads or os.cpu_count() or 1
    # fewer threads than the budget; without one, also every logical core (onnxruntime's default is one
    # thread per physical core)
    counts = {c for c in (1, 2, 4, 8, 16, 32, 64) if c < budget} | ({budget} if threads is None else set())
    for count in sorted(counts):
        options[f"{count} thread" + ("s" if count > 1 else "")] = dataclasses.replace(base, intra_op_threads=count)
    return options


def _combine(base: SessionSettings, kept: list[tuple[SessionSettings, float]]) -> SessionSettings:
    """Every kept knob at once; where two kept settings set the same field, the faster one's value."""
    changes: dict[str, Any] = {}
    for settings, _ in sorted(kept, key=lambda pair: pair[1]):  # the fastest written last, so it wins
        for f in dataclasses.fields(settings):
            if getattr(settings, f.name) != getattr(base, f.name):
                changes[f.name] = getattr(settings, f.name)
    return dataclasses.replace(base, **changes)


def tune_session(
    reference: Reference,
    *,
    threads: int | None = None,
    min_gain: float = MIN_GAIN,
    seconds: float = 3.0,
    measure: Measure | None = None,
    progress: Progress = ignore,
) -> SessionTuning:
    """The session settings that run ``reference.model`` faster than the defaults on its target, each
    confirmed in two interleaved runs (the module's rule). ``threads``: the user's thread budget (the
    baseline's threads; candidates use fewer). ``seconds``: about how long each interleaved run takes.
    ``measure``: how one interleaved run is timed (default: ``reference.time_against`` on its feeds)."""
    base = SessionSettings(intra_op_threads=threads)
    measure = measure or _time_against(reference, base, seconds)
    controls: list[float] = []

    def run(settings: Mapping[str, SessionSettings]) -> tuple[dict[str, float], float]:
        """One interleaved run with a second copy of the defaults beside them (an A/A control): the bar a
        setting must clear in this run is min_gain, or twice the control's own distance from 1 if larger."""
        speedups = measure({**settings, CONTROL: base})
        control = speedups.pop(CONTROL)
        controls.append(round(control, 4))
        return speedups, 1 + max(min_gain, 2 * abs(control - 1))

    candidates = candidate_settings(reference.proto, threads)
    step(progress, "session options", message=f"timing {len(candidates)} settings against onnxruntime's defaults")
    first, first_bar = run(candidates)
    promising = {label: candidates[label] for label, speedup in first.items() if speedup > first_bar}
    second, second_bar = run(promising) if promising else ({}, float("inf"))
    trials = []
    kept: list[tuple[SessionSettings, float]] = []
    for label, settings in candidates.items():
        speedups = (first[label], second[label]) if label in second else (first[label],)
        held = label in second and second[label] > second_bar
        trials.append(SettingTrial(label, settings.changes(), tuple(round(s, 4) for s in speedups), held))
        if held:
            kept.append((settings, min(speedups)))
    chosen, speedup = base, None
    if kept:
        best, best_speedup = max(kept, key=lambda pair: pair[1])
        chosen, speedup = best, best_speedup
        combined = _combine(base, kept)
        if len(kept) > 1 and combined != best:
            step(progress, "session options", message=f"confirming the combination {combined.label}")
            (one, bar_one), (two, bar_two) = run({"combined": combined}), run({"combined": combined})
            runs = (one["combined"], two["combined"])
            held = runs[0] > max(bar_one, best_speedup) and runs[1] > max(bar_two, best_speedup)
            trials.append(SettingTrial("combined", combined.changes(), tuple(round(s, 4) for s in runs), held))
            if held:
                chosen, speedup = combined, min(runs)
    return SessionTuning(chosen, speedup, tuple(trials), min_gain, threads, tuple(controls))


def _time_against(reference: Reference, base: SessionSettings, seconds: float) -> Measure:
    name = "onnxruntime defaults"

    def measure(candidates: Mapping[str, SessionSettings]) -> dict[str, float]:
        models = {label: reference.model for label in candidates}
        timings = reference.time_against(models, rounds=500, seconds=seconds, reference_name=name,
                                         settings={name: base, **candidates})
        return {label: timings[label].speedup for label in candidates}

    return measure


def tune_session_file(
    model: str | os.PathLike,
    data: Any = None,
    target: str = "cpu",
    *,
    threads: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    min_gain: float = MIN_GAIN,
    seconds: float = 3.0,
    reads: tuple[str | os.PathLike | None, ...] = (),
    measure: Measure | None = None,
    progress: Progress = ignore,
) -> SessionTuning:
    """Tune ``model``'s session on ``target`` (fed ``data``'s first samples, else generated inputs of
    ``input_shapes``) and write ``model.session.json`` when a setting held up; a stale settings file
    onnxforge wrote earlier is removed when none did (it was measured for another model or machine)."""
    path = Path(model)
    reference = Reference(path, data, target, input_shapes=input_shapes)
    tuning = tune_session(reference, threads=threads, min_gain=min_gain, seconds=seconds, measure=measure,
                          progress=progress)
    sidecar = settings_path(path)
    if tuning.improved:
        measured = {"speedup": tuning.speedup, "target": reference.target.name, "min_gain": min_gain,
                    "trials": [t.to_json() for t in tuning.trials]}
        written = write_settings(path, tuning.chosen, measured, data if isinstance(data, (str, os.PathLike))
                                 else None, *reads)
        return dataclasses.replace(tuning, written=str(written))
    if sidecar.is_file() and is_ours(sidecar):
        sidecar.unlink()
        step(progress, "session options", message=f"removed {sidecar.name}: its settings are no longer measured faster")
    return tuning
