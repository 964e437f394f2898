"""A search trial as the study log and ``pareto.json`` record it: typed, and written by the codec.

``evaluate_plan`` fills a ``TrialRecord`` as the trial goes; a trial that fails part-way has only the
keys it reached (``ABSENT`` fields are not written), then ``error``, then ``seconds``, exactly as the
search has always written them. At the boundary with the search loop (Optuna's user attributes, the
Ray workers, the Pareto front) the record travels as its ``to_json()`` data; ``TrialRecord.from_json``
reads such data back, checking the keys a trial writes (the search adds its own later: ``on_front``,
``front_path``, ``timed_on``, ...; those are kept as they are).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxforge.errors import RecipeError
from onnxforge.pipeline import codec
from onnxforge.pipeline.codec import ABSENT, Absent

__all__ = ["TrialRecord", "TrialStage"]


@dataclass(kw_only=True)
class TrialStage(codec.JsonResult):
    """One stage of a trial's chain: how it ran and with which config (codec data)."""

    kind: str
    status: str
    cache: str
    seconds: float = field(metadata={"encode": codec.rounded(3)})
    config: dict[str, Any]
    summary: str | Absent = ABSENT  # a stage whose own gate failed has none
    train_seconds: float | Absent = ABSENT  # a distillation: how long it trained when it was computed


@dataclass(kw_only=True)
class TrialRecord(codec.JsonResult):
    """One trial: its plan, then what was measured, in the order it was measured (``ABSENT``: not reached)."""

    number: int
    plan: dict[str, Any]
    describe: str
    status: str = "ok"  # ok | failed
    stages: tuple[TrialStage, ...] | Absent = ABSENT
    distilled: bool | Absent = ABSENT  # whether a stage was trained against the source model
    training_seconds: float | Absent = ABSENT
    quality: float | Absent = ABSENT  # the metric on the eval data
    loss: float | Absent = ABSENT  # what the search minimizes for quality (search.trial.quality_loss)
    within_budget: bool | Absent = ABSENT
    eval_samples: int | Absent = ABSENT  # how many eval samples it was scored on (coarse, or all for the front)
    bytes: int | Absent = ABSENT
    sha256: str | Absent = ABSENT
    params: int | Absent | None = ABSENT  # estimates beside the measurement (None: could not be counted)
    macs_estimate: int | Absent | None = ABSENT
    cost_estimate: float | Absent = ABSENT  # size and MACs relative to the input's: what steers the sampler
    reference_ms: float | Absent = ABSENT  # the input model's p50 in the same interleaved run
    model_ms: float | Absent = ABSENT
    ratio: float | Absent = ABSENT  # model_ms / reference_ms: the latency objective
    speedup: float | Absent = ABSENT
    ratio_spread: float | Absent = ABSENT  # (max - min) / median of the ratios of its timing calls
    path: str | Absent = ABSENT  # where the trial's model was kept
    error: str | Absent = ABSENT  # why a failed trial failed
    seconds: float | Absent = ABSENT

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "trial record") -> tuple[TrialRecord, dict[str, Any]]:
        """The record in ``data`` (a study log's user attribute, a ``pareto.json`` trial), its keys checked
        and decoded by the codec (RecipeError naming ``where`` and the key), and the keys the search added
        after the trial, as they are."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
        for key in ("number", "plan", "describe", "status"):
            if key not in data:
                raise RecipeError(f"{where}: no {key!r}")
        hints = typing.get_type_hints(cls, globalns={**globals(), "TrialStage": TrialStage})
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: codec.decode(hints[k], v, f"{where}.{k}") for k, v in data.items() if k in known}
        return cls(**values), {k: v for k, v in data.items() if k not in known}
