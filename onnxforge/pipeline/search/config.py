"""What ``onnxforge optimize`` searches for: the budget, the objective, the strategy, where trials run.

The same dataclass is built by the CLI flags, by a recipe's ``search:`` section and by
``onnxforge.optimize(...)``; it goes through the config codec like every stage config.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxforge.errors import UsageError
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import Metric, set_metric_field
from onnxforge.pipeline.gate_fields import GateRules
from onnxforge.pipeline.objective import Objective

__all__ = ["Objective", "OptimizeConfig", "Strategy", "config_from_recipe"]


class Strategy(enum.Enum):
    TPE = "tpe"  # Optuna's multi-objective TPE: good with a few dozen trials
    NSGA2 = "nsga2"  # Optuna's NSGA-II: for larger budgets
    RANDOM = "random"
    GRID = "grid"  # every combination of the knobs' grid values (each range knob needs a step)


@dataclass(frozen=True, kw_only=True)
class OptimizeConfig(GateRules):
    """How to search.

    calibration / eval_data: samples for the stages (repair, quantization) and for the fitness; eval
      data with a ``label`` array gives accuracy, else agreement (classifiers) or cosine (embeddings).
    metric / tolerance / max_churn / worst_cosine: the accuracy budget, the gate's rules as in quantize
      (``GateRules``; ``--max-drop PTS`` is accuracy with a tolerance of PTS points).
    objective: what "best" means among models within budget.
    trials / time_budget_s: the search stops at whichever comes first (completed trials of an
      earlier run in the same folder count).
    passes: restrict the space to these registered passes (default: every pass with knobs).
    space: pin knobs to listed values, ``{"prune_channels.ratio": [0.25, 0.5]}``.
    batch / threads: the latency measurement's batch size and intra-op threads; with several of either
      (``batch=(1, 32)``), one front and one best model per (batch, threads) setting (``settings``):
      trials are timed at the first, every front candidate again at each.
    ray_address: run trials as Ray tasks (``local`` starts a private local instance; ``auto`` or
      ``ray://host:port`` joins a cluster). Where trials run does not change what they compute.
    min_speedup: stop early once a model within budget is at least this much faster.
    coarse_samples: every trial is scored on the first this many eval samples; front candidates are
      scored again on all of them before the front and the choice are drawn (None: all, every trial).
    timing_repeats: interleaved timing calls per trial (its ratio is their median; ``search.timing``).
    timing_resolution: None (default): the sampler is steered by quality and a deterministic cost
      estimate (size and MACs), so the plans are a function of the seed; a number: by the measured ratio
      on a ladder of that relative step (0.1: ratios within 10% are a tie). ``search.timing``.
    """

    calibration: DataSpec
    eval_data: DataSpec
    target: str = "cpu"
    objective: Objective = Objective.LATENCY
    trials: int = 24
    time_budget_s: float | None = None
    strategy: Strategy = Strategy.TPE
    seed: int = 0
    passes: tuple[str, ...] | None = None
    space: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    batch: int | tuple[int, ...] = 1
    threads: int | tuple[int, ...] = 1
    latency_rounds: int = 20
    coarse_samples: int | None = 256
    timing_repeats: int = 3
    timing_resolution: float | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    dynamic_batch: bool = True
    min_speedup: float | None = None
    ray_address: str | None = field(default=None, metadata={"key": False})
    # best.onnx gets its measured session options beside it (session_tuning); not part of the search
    tune_session: bool = field(default=False, metadata={"key": False})

    def __post_init__(self) -> None:
        set_metric_field(self)  # a metric's name or file.py:function from the Python API
        if self.trials < 1:
            raise UsageError(f"--trials {self.trials}: must be at least 1")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise UsageError(f"--time-budget {self.time_budget_s:g}s: must be positive")
        for name in ("batch", "threads"):
            value = getattr(self, name)
            if isinstance(value, tuple) and (not value or len(set(value)) != len(value)):
                raise UsageError(f"--{name} {','.join(map(str, value))}: give distinct values")
        if min(min(s) for s in self.settings) < 1 or self.latency_rounds < 3:
            raise UsageError("--batch and --threads must be at least 1, latency_rounds at least 3")
        if self.coarse_samples is not None and self.coarse_samples < 1:
            raise UsageError(f"coarse_samples {self.coarse_samples}: must be at least 1 (or None: all)")
        if self.timing_repeats < 1 or not (self.timing_resolution is None or 0 <= self.timing_resolution < 1):
            raise UsageError("timing_repeats must be at least 1 and timing_resolution in [0, 1)")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise UsageError("--min-speedup must be positive")
        if self.tolerance is not None and self.tolerance < 0:
            raise UsageError(f"--tolerance {self.tolerance}: must be >= 0")

    @property
    def settings(self) -> list[tuple[int, int]]:
        """Every (batch, threads) a front is drawn at; the first is what trials are timed at."""
        return [(b, t) for b in _values(self.batch) for t in _values(self.threads)]


def _values(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,)


def config_from_recipe(recipe: Any, base: Any = None) -> OptimizeConfig:
    """The ``search:`` section of a recipe as an OptimizeConfig; the recipe's top level gives the data,
    the target and the input shapes (``search: {max_drop: 0.5, trials: 24}``; any OptimizeConfig field)."""
    from onnxforge.errors import RecipeError
    from onnxforge.pipeline import codec

    if recipe.calibration is None or recipe.eval_data is None:
        raise RecipeError("recipe: a search needs 'calibration' and 'eval' data")
    values = dict(recipe.search or {})
    if "max_drop" in values:
        if "metric" in values or "tolerance" in values:
            raise RecipeError("search: max_drop is the accuracy budget; it does not combine with metric/tolerance")
        values["metric"], values["tolerance"] = "accuracy", values.pop("max_drop")
    for key in ("calibration", "eval_data", "target"):
        if key in values:
            raise RecipeError(f"search.{key}: set it at the recipe's top level")
    values.update(calibration=recipe.calibration, eval_data=recipe.eval_data, target=recipe.target)
    decoded = {k: v for k, v in values.items() if k in ("calibration", "eval_data")}
    rest = {k: v for k, v in values.items() if k not in decoded}
    rest.setdefault("input_shapes", codec.encode(recipe.input_shapes))
    rest.setdefault("dynamic_batch", recipe.dynamic_batch)
    rest.setdefault("tune_session", recipe.tune_session)
    config = codec.decode_dataclass(OptimizeConfig, {**rest, "calibration": str(recipe.calibration.path),
                                                      "eval_data": str(recipe.eval_data.path)}, "search", base)
    import dataclasses

    return dataclasses.replace(config, **decoded)


# A flag beside a recipe: the flags that override its ``search:`` values, and those refused because the
# recipe's top level owns what they set (its data, its target, its input shapes).
FLAG_FIELDS = {"--trials": "trials", "--time-budget": "time_budget_s", "--strategy": "strategy", "--seed": "seed",
               "--objective": "objective", "--pass": "passes", "--space": "space", "--batch": "batch",
               "--threads": "threads", "--min-speedup": "min_speedup", "--metric": "metric", "--tolerance": "tolerance",
               "--max-churn": "max_churn", "--worst-cosine": "worst_cosine", "--max-drop": "tolerance",
               "--ray-address": "ray_address",
               "--tune-session": "tune_session"}
RECIPE_OWNED = {"--calibration": "calibration", "--eval": "eval", "--target": "target", "--input-shape": "input_shapes"}


def override_from_flags(config: OptimizeConfig, flags: Mapping[str, Any]) -> tuple[OptimizeConfig, list[str]]:
    """``config`` (from a recipe) with the values of the flags given beside it, and a note per override.

    ``flags`` maps a flag as typed (``--trials``) to its parsed value (seconds for ``--time-budget``,
    ``{knob: values}`` for ``--space``, which pins those knobs on top of the recipe's). A flag for what the
    recipe's top level sets (its data, target, input shapes) is refused: edit the recipe instead.
    """
    import dataclasses
    import typing

    from onnxforge.errors import RecipeError
    from onnxforge.pipeline import codec

    for flag in flags:
        if flag in RECIPE_OWNED:
            raise UsageError(f"{flag} beside a recipe: the recipe sets its {RECIPE_OWNED[flag]}",
                             hint=f"edit '{RECIPE_OWNED[flag]}' in the recipe, or give the model instead of the recipe")
        if flag not in FLAG_FIELDS:
            raise UsageError(f"{flag} does not apply beside a recipe")
    if "--max-drop" in flags and ({"--metric", "--tolerance"} & set(flags)):
        raise UsageError("--max-drop is the accuracy budget; it does not combine with --metric/--tolerance")
    hints = typing.get_type_hints(OptimizeConfig)
    changes: dict[str, Any] = {}
    notes = []
    for flag, value in flags.items():
        name = FLAG_FIELDS[flag]
        if flag == "--space":
            value = {**config.space, **value}
        try:
            changes[name] = codec.decode(hints[name], codec.encode(value), flag)
        except RecipeError as e:
            raise UsageError(e.message, hint=e.hint) from e
        if flag == "--max-drop":
            changes["metric"] = Metric.ACCURACY
        shown = " ".join(f"{k}={','.join(map(str, v))}" for k, v in flags[flag].items()) if flag == "--space" else (
            " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value)
        if flag != "--ray-address":  # where trials run changes nothing they compute
            notes.append(f"{flag} {shown} overrides the recipe's search.{name} "
                         f"({codec.encode(getattr(config, name))})")
    return dataclasses.replace(config, **changes), notes
