"""The search space, read from the pass registry: which passes a trial may chain and with which knobs.

Passes that declare knobs are grouped by phase (structure before sparsity before precision: the
registry's ``Phase`` order is the only order the search composes them in). A trial picks, per phase,
one pass or none, then that pass's knob values. Parameters are named ``<phase>`` (the pass chosen)
and ``<pass>.<field>`` (its knob), so they read the same in ``pareto.json``, in a recipe's
``search.space`` and in Optuna's storage.
"""

from __future__ import annotations

import itertools
import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from onnxforge.errors import UsageError
from onnxforge.pipeline import codec
from onnxforge.pipeline.registry import Artifact, Knob, KnobKind, Phase, registered_passes

if TYPE_CHECKING:
    import onnx

__all__ = ["NONE", "SearchSpace", "TrialPlan"]

NONE = "none"


@dataclass(frozen=True)
class TrialPlan:
    """A trial's chain: (pass name, knob values as codec data) in phase order."""

    params: Mapping[str, Any]
    stages: tuple[tuple[str, Mapping[str, Any]], ...]

    def describe(self) -> str:
        if not self.stages:
            return "input model (simplified)"
        parts = []
        for name, knobs in self.stages:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in knobs.items())
            parts.append(f"{name}({shown})" if shown else name)
        return " -> ".join(parts)


def _check_in_knob(key: str, knob: Knob, value: Any) -> None:
    """Refuse a pinned value outside the knob's declared range or choices (the registry's word on
    what the pass accepts), before the first trial rather than as a failed trial each time."""
    if knob.kind is KnobKind.CHOICE:
        spelled = {json.dumps(codec.encode(c), sort_keys=True) for c in knob.choices}
        if json.dumps(codec.encode(value), sort_keys=True) not in spelled:
            shown = ", ".join(str(_short(codec.encode(c))) for c in knob.choices)
            raise UsageError(f"search space {key}={_short(value)}: not one of the knob's choices ({shown})")
        return
    low, high = knob.low, knob.high
    assert low is not None and high is not None  # a range knob has both (Knob.__post_init__)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise UsageError(f"search space {key}={value!r}: outside the knob's range [{knob.low:g}, {knob.high:g}]")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and len(value) == 1:
        return str(value[0])
    return str(value)


class SearchSpace:
    """The space for one target and one graph: ``phases`` maps each phase to the passes (with knobs) in it.

    ``model``: the graph every trial starts from; each pass proposes only the knobs that apply to it
    (``Pass.knobs(target, model)``), and ``inapplicable`` names the passes that had none for it.
    """

    def __init__(self, target: str, passes: Sequence[str] | None = None,
                 pinned: Mapping[str, Sequence[Any]] | None = None, *, has_source: bool = True,
                 model: onnx.ModelProto | None = None) -> None:
        registry = registered_passes()
        unknown = sorted(set(passes or ()) - set(registry))
        if unknown:
            raise UsageError(f"--pass {unknown[0]!r} is not a registered pass; passes: {', '.join(registry)}")
        self.target = target
        self.knobs: dict[str, tuple[Knob, ...]] = {}
        self.phases: dict[Phase, list[str]] = {}
        self.inapplicable: list[str] = []
        for name, cls in registry.items():
            if passes is not None and name not in passes:
                continue
            knobs = cls.knobs(target, model)
            if not knobs:
                if model is not None and cls.knobs(target):
                    self.inapplicable.append(name)  # it has knobs, none of which apply to this graph
                continue
            if Artifact.SOURCE in cls.consumes and not has_source:
                continue  # distill trains against the framework model: an .onnx input has none
            self.knobs[name] = knobs
            self.phases.setdefault(cls.phase, []).append(name)
        if not self.knobs:
            why = f" ({', '.join(self.inapplicable)}: nothing to act on in this model)" if self.inapplicable else ""
            raise UsageError(f"nothing to search: no selected pass declares knobs for this model{why}")
        self.pinned = {k: list(v) for k, v in (pinned or {}).items()}
        known = {f"{p}.{k.field}" for p, ks in self.knobs.items() for k in ks} | {p.name.lower() for p in self.phases}
        for key, values in self.pinned.items():
            if key.split(".", 1)[0] in self.inapplicable:
                raise UsageError(f"search space: {key}: {key.split('.', 1)[0]} has nothing to act on in this model")
            if key not in known:
                raise UsageError(f"search space: unknown knob {key!r}; knobs: {', '.join(sorted(known))}")
            if not isinstance(values, list) or not values:
                raise UsageError(f"search space: {key} needs a non-empty list of values")
        for phase_key, values in self.pinned.items():
            if phase_key in {p.name.lower() for p in self.phases}:
                phase = Phase[phase_key.upper()]
                bad = [v for v in values if v != NONE and v not in self.phases[phase]]
                if bad:
                    raise UsageError(f"search space: {phase_key} can be {NONE} or {', '.join(self.phases[phase])}")
        self._check_pinned_values()

    def _check_pinned_values(self) -> None:
        registry = registered_passes()
        for name, knobs in self.knobs.items():
            hints = typing.get_type_hints(registry[name].config_cls)
            for knob in knobs:
                for value in self.pinned.get(f"{name}.{knob.field}", []):
                    codec.decode(hints[knob.field], value, f"search space {name}.{knob.field}")
                    _check_in_knob(f"{name}.{knob.field}", knob, value)

    # -- sampling ------------------------------------------------------------------------------

    @staticmethod
    def phase_applies(phase: Phase, chosen: Mapping[str, Any]) -> bool:
        """Whether a trial that chose ``chosen`` (phase name -> pass) so far picks a pass for ``phase``:
        recovery retrains what a structure pass removed, so without one it is not sampled (a distill
        after nothing is skipped when the chain is built, and the sampler would spend trials on copies)."""
        return phase is not Phase.RECOVERY or chosen.get(Phase.STRUCTURE.name.lower(), NONE) != NONE

    def phase_choices(self, phase: Phase) -> list[str]:
        pinned = self.pinned.get(phase.name.lower())
        return list(pinned) if pinned else [NONE, *self.phases[phase]]

    def knob_values(self, pass_name: str, knob: Knob) -> list[Any] | None:
        """The grid of a knob: pinned values, its choices, or its range by step (None: continuous)."""
        pinned = self.pinned.get(f"{pass_name}.{knob.field}")
        if pinned:
            return list(pinned)
        if knob.kind is KnobKind.CHOICE:
            return list(knob.choices)
        if knob.step is None:
            return None
        low, high = knob.bounds()
        count = math.floor((high - low) / knob.step + 1e-9) + 1
        values = [low + i * knob.step for i in range(count)]
        return [round(v) for v in values] if knob.kind is KnobKind.INT else [round(v, 6) for v in values]

    def suggest(self, trial: Any) -> TrialPlan:
        """Sample a plan with an Optuna trial (define-by-run: knobs only for the passes chosen)."""
        params: dict[str, Any] = {}
        stages = []
        for phase in sorted(self.phases):
            if not self.phase_applies(phase, params):
                params[phase.name.lower()] = NONE
                continue
            choices = self.phase_choices(phase)
            chosen = trial.suggest_categorical(phase.name.lower(), choices)
            params[phase.name.lower()] = chosen
            if chosen == NONE:
                continue
            values = {}
            for knob in self.knobs[chosen]:
                key = f"{chosen}.{knob.field}"
                grid = self.knob_values(chosen, knob)
                if grid is not None and (knob.kind is KnobKind.CHOICE or key in self.pinned):
                    encoded = [json.dumps(v) for v in grid]
                    value = json.loads(trial.suggest_categorical(key, encoded))
                elif knob.kind is KnobKind.INT:
                    low, high = knob.bounds()
                    value = trial.suggest_int(key, int(low), int(high), step=int(knob.step or 1))
                else:
                    low, high = knob.bounds()
                    value = trial.suggest_float(key, low, high, step=knob.step)
                    value = round(value, 6)
                params[key] = value
                values[knob.field] = value
            stages.append((chosen, values))
        return TrialPlan(params, tuple(stages))

    def optuna_params(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        """Plan parameters as Optuna stores them (categorical knobs as their JSON text), for enqueue_trial."""
        out = {}
        for key, value in plan.items():
            if "." in key:
                name, field = key.split(".", 1)
                knob = next(k for k in self.knobs[name] if k.field == field)
                if knob.kind is KnobKind.CHOICE or key in self.pinned:
                    value = json.dumps(value)
            out[key] = value
        return out

    def grid(self) -> list[dict[str, Any]]:
        """Every combination (for the grid strategy); each range knob needs a step or pinned values."""
        plans: list[dict[str, Any]] = [{}]
        for phase in sorted(self.phases):
            extended = []
            for plan in plans:
                for chosen in (self.phase_choices(phase) if self.phase_applies(phase, plan) else [NONE]):
                    if chosen == NONE:
                        extended.append({**plan, phase.name.lower(): NONE})
                        continue
                    axes = []
                    for knob in self.knobs[chosen]:
                        values = self.knob_values(chosen, knob)
                        if values is None:
                            raise UsageError(f"the grid strategy needs values for {chosen}.{knob.field}",
                                             hint=f"pin them in the search space, e.g. {chosen}.{knob.field}: [...]")
                        axes.append([(f"{chosen}.{knob.field}", v) for v in values])
                    for combo in itertools.product(*axes):
                        extended.append({**plan, phase.name.lower(): chosen, **dict(combo)})
            plans = extended
        return plans

    def seeds(self) -> list[dict[str, Any]]:
        """Single-stage baselines to start a search with: each pass alone at its middle setting
        (every choice of a quantization scheme), so the front is never worse than the best one stage."""
        seeds = [{p.name.lower(): NONE for p in sorted(self.phases)}]  # the simplified input alone
        for phase in sorted(self.phases):
            for name in self.phase_choices(phase):
                if name == NONE or phase is Phase.RECOVERY:  # recovery alone has nothing to recover
                    continue
                knobs = self.knobs[name]
                combos: list[dict[str, Any]] = [{}]
                for knob in knobs:
                    values = self.knob_values(name, knob)
                    if values is not None and knob.seed_every_choice:
                        options = values
                    elif values is not None and knob.kind is KnobKind.CHOICE:
                        options = values[:1]
                    elif values:
                        options = [values[len(values) // 2]]
                    else:
                        low, high = knob.bounds()
                        options = [round((low + high) / 2, 6)]
                    combos = [{**c, f"{name}.{knob.field}": v} for c in combos for v in options]
                for combo in combos:
                    plan = {p.name.lower(): NONE for p in sorted(self.phases)}
                    plan[phase.name.lower()] = name
                    seeds.append({**plan, **combo})
        return seeds

    def plan_from_params(self, params: Mapping[str, Any]) -> TrialPlan:
        """Rebuild a plan from stored parameters (as ``suggest`` named them; JSON text decoded)."""
        decoded = {}
        for key, value in params.items():
            if "." in key and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            decoded[key] = value
        stages = []
        for phase in sorted(self.phases):
            chosen = decoded.get(phase.name.lower(), NONE)
            if chosen == NONE:
                continue
            values = {k.field: decoded[f"{chosen}.{k.field}"] for k in self.knobs[chosen]
                      if f"{chosen}.{k.field}" in decoded}
            stages.append((chosen, values))
        return TrialPlan(decoded, tuple(stages))

    def describe(self) -> dict[str, Any]:
        return {
            phase.name.lower(): {
                name: {k.field: (self.knob_values(name, k) or [k.low, k.high]) for k in self.knobs[name]}
                for name in self.phase_choices(phase) if name != NONE
            }
            for phase in sorted(self.phases)
        }
