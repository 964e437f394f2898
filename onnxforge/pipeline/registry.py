"""The pass registry: every stage kind is declared once, as a ``Pass`` subclass in ``pipeline/passes/``.

A declaration says everything the rest of onnxforge needs, so recipes, the runner, the search, the
CLI's run table and the report read it instead of keeping their own lists:

- ``name`` — the recipe spelling (``prune_channels``) and the manifest's stage kind;
- ``config_cls`` — the frozen keyword-only config dataclass (saved, hashed and cached by the codec);
- ``consumes`` / ``produces`` — artifacts: an ONNX model, or a framework source (``file.py:callable``,
  ``.pt``, ``.pt2``, ``.keras``, ``builtin:NAME``); a pass that consumes several takes several inputs,
  and a ``variadic`` one takes one or more (an ensemble of any size);
- ``phase`` — where it sits in a pipeline (structure before sparsity before precision), which is the
  order the search composes passes in;
- ``fills`` — config fields the recipe fills from its top level when the stage leaves them unset
  (``eval_data`` from ``eval``, ``target`` from ``target``), and ``reads`` — recipe-level data the
  pass reads outside its config (quantize reads ``calibration``): both are part of the cache key;
- ``knobs(target, model)`` — what the search may vary, with ranges, on this target for this graph
  (only what applies to it: no int4 without MatMul weights, no channel ratio without a prunable group);
- ``run(...)`` — the work: inputs in, the output file written, a result with ``to_json()`` back (a
  pass is ``Pass[ConfigT, ResultT]``: its config class and its result class, typed);
- ``summary(result_json)`` — one phrase for the run table and the report.

Adding a stage is one new file in ``pipeline/passes/``: it is imported (and so registered) the first
time the registry is read.
"""

from __future__ import annotations

import abc
import enum
import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from onnxforge.errors import CalibrationDataError
from onnxforge.pipeline.progress import Progress, ignore

if TYPE_CHECKING:  # the cache and the data specs import the registry's users; the types are for the checker
    import numpy as np
    import onnx

    from onnxforge.pipeline.cache import StageCache
    from onnxforge.pipeline.data_spec import DataSpec

__all__ = [
    "Artifact",
    "Knob",
    "KnobKind",
    "Pass",
    "Phase",
    "StageContext",
    "StageResult",
    "get_pass",
    "register",
    "registered_passes",
]


class Artifact(enum.Enum):
    ONNX = "onnx"
    SOURCE = "source"  # a framework model the converters load (file.py:callable, .pt, .pt2, .keras, builtin:)


class Phase(enum.IntEnum):
    """Where a pass belongs in a pipeline; the search composes passes in this order."""

    EXPORT = 0
    GRAPH = 10  # simplification: same math, fewer nodes
    STRUCTURE = 20  # channel pruning, low-rank: smaller layers
    RECOVERY = 25  # distillation: retrain what structure removed
    SPARSITY = 30  # magnitude pruning: zeros, same shapes
    PRECISION = 40  # quantization, fp16
    PACKAGING = 50  # merging pre/post-processing and ensembles


class KnobKind(enum.Enum):
    FLOAT = "float"
    INT = "int"
    CHOICE = "choice"


@dataclass(frozen=True)
class Knob:
    """One config field the search may vary: a range (FLOAT/INT, ``step`` optional) or ``choices``.

    Choices are written as the codec spells them (``"qdq-u8s8-per-channel"``, ``"l2"``), so a trial's
    parameters are plain data and decode into the config like a recipe's options.
    """

    field: str
    kind: KnobKind
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    help: str = ""
    seed_every_choice: bool = False  # the search's seed trials try each choice alone (quantization schemes)

    def __post_init__(self) -> None:
        if self.kind is KnobKind.CHOICE and not self.choices:
            raise ValueError(f"knob {self.field}: a choice knob needs choices")
        if self.kind is not KnobKind.CHOICE and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"knob {self.field}: a range knob needs low <= high")

    def bounds(self) -> tuple[float, float]:
        """(low, high) of a range knob (``__post_init__`` checked both are set)."""
        if self.low is None or self.high is None:
            raise ValueError(f"knob {self.field}: a choice knob has no range")
        return self.low, self.high


@dataclass
class StageContext:
    """What a stage may read beyond its config and inputs: the recipe's target, data and shapes."""

    target: str = "cpu"
    calibration: DataSpec | None = None
    eval_data: DataSpec | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    dynamic_batch: bool = False
    max_samples: int | None = None  # samples read from each data file at most (None: the stages' defaults)
    input_dtypes: Mapping[str, np.dtype] = field(default_factory=dict)  # input name -> dtype (recipe ``inputs:``)
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)  # input name -> {axis: dim name}
    cache: StageCache | None = None  # where a stage may record measurements a re-run reuses (quantize's timings)
    progress: Progress = ignore  # where a long stage reports its phases (onnxforge.pipeline.progress)

    def require_calibration(self, stage: str) -> DataSpec:
        if self.calibration is None:
            raise CalibrationDataError(f"the {stage} stage needs calibration data",
                                       hint="set 'calibration' in the recipe")
        return self.calibration

    def value(self, item: str) -> Any:
        """A recipe-level item by its recipe key (``calibration``, ``eval``, ``target``, ``input_shapes``, ...)."""
        return {"eval": self.eval_data}.get(item, getattr(self, item, None))


class StageResult(Protocol):
    """What a pass's ``run`` returns: a result saved as JSON (a ``codec.JsonResult`` dataclass, or a class
    with its own ``to_json``) into the manifest and the cache."""

    def to_json(self) -> dict[str, Any]: ...


ConfigT = TypeVar("ConfigT")
ResultT = TypeVar("ResultT", bound=StageResult)


class Pass(abc.ABC, Generic[ConfigT, ResultT]):
    """A stage kind, generic over its config (``config_cls``) and the result ``run`` returns. Subclasses set
    the class attributes and implement ``run`` and ``summary``."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    description: ClassVar[str] = ""
    consumes: ClassVar[tuple[Artifact, ...]] = (Artifact.ONNX,)
    variadic: ClassVar[bool] = False  # True: one or more inputs, each of the kind consumes[0] (an ensemble)
    produces: ClassVar[Artifact] = Artifact.ONNX
    phase: ClassVar[Phase] = Phase.GRAPH
    fills: ClassVar[Mapping[str, str]] = {}  # config field -> recipe key whose value fills it when unset
    reads: ClassVar[tuple[str, ...]] = ()  # recipe keys read outside the config (part of the cache key)

    @classmethod
    def knobs(cls, target: str, model: onnx.ModelProto | None = None) -> tuple[Knob, ...]:
        """What the search may vary on ``target`` for ``model`` (the graph trials start from): only what
        applies to that graph, so no trial is spent on a no-op or a setting that cannot run there. Empty:
        nothing worth searching (on this graph). ``model`` None: every knob the pass has on ``target``."""
        return ()

    @classmethod
    def from_recipe(cls, values: dict[str, Any], context: StageContext, where: str) -> dict[str, Any]:
        """The stage's recipe options (codec data, after ``fills``) completed or checked against the
        recipe's top level where a field-for-field fill cannot say it (merge's image ``pre`` takes the
        image calibration's normalization); RecipeError naming ``where``. Default: unchanged."""
        return values

    @classmethod
    def search_defaults(cls, context: StageContext) -> dict[str, Any]:
        """Config values (codec data) a search trial starts from before its knobs are applied: the
        data the pass needs, and settings that make it do one measured thing (no internal back-off or
        choice: the search measures the whole chain itself)."""
        return {}

    @abc.abstractmethod
    def run(self, config: ConfigT, inputs: Sequence[str], output: Path, context: StageContext) -> ResultT:
        """Write ``output`` from ``inputs`` (paths or source specs) and return a result with ``to_json()``."""

    def verified(self, result: ResultT) -> bool:
        """Whether the output was checked against its input (an export whose parity failed is not)."""
        return True

    @staticmethod
    def summary(result: Mapping[str, Any]) -> str:
        """One phrase for the run table and the report, from the result's JSON.

        A phrase that quotes a speed reads it from ``measured_speedup`` (the stage's speed over its
        input's): in a run, the runner sets it from the table's own interleaved timing
        (``runner._speed_against_inputs``), so the row and its phrase say the same number."""
        return ""


_PASSES: dict[str, type[Pass[Any, Any]]] = {}
_LOADED = False


def register(cls: type[Pass[Any, Any]]) -> type[Pass[Any, Any]]:
    """Class decorator: add a pass to the registry (a name may be registered once)."""
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"two passes are named {cls.name!r}: {_PASSES[cls.name].__module__} and {cls.__module__}")
    _PASSES[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    global _LOADED
    if _LOADED:
        return
    from onnxforge.pipeline import passes

    for module in pkgutil.iter_modules(passes.__path__):
        importlib.import_module(f"{passes.__name__}.{module.name}")
    _LOADED = True


def registered_passes() -> dict[str, type[Pass[Any, Any]]]:
    """Every registered pass by name, in pipeline order (phase, then name)."""
    _load_builtin_passes()
    return dict(sorted(_PASSES.items(), key=lambda kv: (kv[1].phase, kv[0])))


def get_pass(name: str) -> type[Pass[Any, Any]] | None:
    return registered_passes().get(name)
