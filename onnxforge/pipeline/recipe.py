"""Pipeline recipes: a YAML file naming the model, its data and the stages to run.

```yaml
model: model.py:build          # or model.onnx, model.pt, model.keras, builtin:digits_cnn
input_shapes: {image: [1, 1, 32, 32]}
dynamic_batch: true
# or, per input, as the CLI's --input-shape input_ids=1x128:int64 --dynamic input_ids=1:sequence:
# inputs: {input_ids: {shape: [1, 128], dtype: int64, dynamic: {0: batch, 1: sequence}}}
calibration: calib.npz         # arrays keyed by input name, first axis = samples
eval: eval.npz                 # held-out samples (+ 'label' for accuracy)
max_samples: 256               # optional: samples read from each data file at most (eval scoring too)
tune_session: true             # optional: measure session options for the last stage's model (.session.json)
target: cpu
stages:
  - export
  - simplify
  - prune_channels: {ratio: 0.5}   # structured: really smaller Convs, repaired by least squares
  - quantize: {tolerance: 0.5}
```

Stages are the registered passes (``onnxforge.pipeline.registry``); their options are the fields
of the pass's config, decoded by the config codec. Data can carry reading options:
``calibration: {path: images/, image_size: [224, 224], mean: [0.485, 0.456, 0.406], std: [...]}``.

A recipe is a small DAG: a stage may say ``name:`` (default: its kind, numbered when repeated) and
``inputs:`` (default: the previous stage, or ``source`` — the recipe's model — for the first), so a
stage can take two models or the framework source. ``name`` and ``inputs`` sit among the options:
``- quantize: {name: q8, inputs: [p50]}``.

Relative paths are relative to the recipe's folder. Unknown keys, wrong types and missing files
are RecipeError (exit 2) naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from onnxforge.converters.source import SourceSpec, parse_source
from onnxforge.errors import RecipeError, UsageError
from onnxforge.pipeline import codec
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.registry import Artifact, Pass, Phase, StageContext, get_pass, registered_passes
from onnxforge.targets import TARGETS

__all__ = [
    "SOURCE",
    "InputDecl",
    "Recipe",
    "StageSpec",
    "config_from_mapping",
    "is_file_input",
    "load_recipe",
    "recipe_from_mapping",
]

SOURCE = "source"  # the name by which a stage names the recipe's model as its input
_TOP_KEYS = {"model", "inputs", "input_shapes", "dynamic_batch", "calibration", "eval", "max_samples", "target",
             "stages", "name", "search", "tune_session"}
INPUT_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
_STAGE_KEYS = {"name", "inputs"}


@dataclass(frozen=True, kw_only=True)
class InputDecl:
    """One model input under a recipe's ``inputs:``: what the CLI says with ``--input-shape
    NAME=1x128:int64`` and ``--dynamic NAME=1:sequence``. ``dynamic`` names axes (``{0: batch, 1:
    sequence}``); ``dtype`` is one of INPUT_DTYPES (None: the exporter's float32)."""

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    dynamic: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in INPUT_DTYPES:
            raise UsageError(f"dtype {self.dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
        if self.shape is not None and (not self.shape or any(d < 1 for d in self.shape)):
            raise UsageError(f"shape {list(self.shape)}: dims must be positive")
        for axis, dim in self.dynamic.items():
            if axis < 0 or (self.shape is not None and axis >= len(self.shape)):
                rank = "" if self.shape is None else f" (the shape has rank {len(self.shape)})"
                raise UsageError(f"dynamic: axis {axis} is not an axis of the input{rank}")
            if not dim.isidentifier():
                raise UsageError(f"dynamic: axis {axis} is named {dim!r}; a dim name is a word such as 'sequence'")


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: Any
    name: str
    inputs: tuple[str, ...] = ()  # stage names or SOURCE; filled by the parser, never empty in a Recipe

    @property
    def pass_cls(self) -> type[Pass]:
        found = get_pass(self.kind)
        if found is None:
            raise RecipeError(f"stage {self.name}: unknown stage kind {self.kind!r}")
        return found


@dataclass(frozen=True)
class Recipe:
    model: str
    stages: tuple[StageSpec, ...]
    calibration: DataSpec | None = None
    eval_data: DataSpec | None = None
    target: str = "cpu"
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    dynamic_batch: bool = False
    name: str = "run"
    input_dtypes: Mapping[str, np.dtype] = field(default_factory=dict)  # from ``inputs:``; fills export
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)  # from ``inputs:``; fills export
    search: Mapping[str, Any] | None = None  # the optimize section, read by onnxforge.pipeline.search
    max_samples: int | None = None  # eval samples the runner scores at most; fills the stages' max_samples
    # the last stage's model gets the session options measured faster for it beside it (session_tuning)
    tune_session: bool = False

    def context(self, progress=None) -> StageContext:
        return StageContext(
            target=self.target, calibration=self.calibration, eval_data=self.eval_data,
            input_shapes=dict(self.input_shapes), dynamic_batch=self.dynamic_batch, max_samples=self.max_samples,
            input_dtypes=dict(self.input_dtypes), dynamic_axes=dict(self.dynamic_axes),
            **({"progress": progress} if progress else {}),
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "calibration": codec.encode(self.calibration),
            "eval": codec.encode(self.eval_data),
            "max_samples": self.max_samples,
            "target": self.target,
            "input_shapes": codec.encode(self.input_shapes),
            "dynamic_batch": self.dynamic_batch,
            "tune_session": self.tune_session,
            "input_dtypes": codec.encode(self.input_dtypes),
            "dynamic_axes": codec.encode(self.dynamic_axes),
            "stages": [
                {"kind": s.kind, "name": s.name, "inputs": list(s.inputs), "config": codec.encode(s.config)}
                for s in self.stages
            ],
            **({"search": dict(self.search)} if self.search else {}),
        }


def config_from_mapping(cls: type, values: Mapping[str, Any], where: str, base: Path = Path(".")) -> Any:
    """Build the frozen config dataclass ``cls`` from recipe values, checking keys, types and files."""
    return codec.decode_dataclass(cls, values, where, base)


def _fill_value(value: Any) -> Any:
    """A recipe-level value as a stage option (codec data): a DataSpec whole, image options included."""
    return codec.encode(value)


def _stage(entry: Any, index: int, context: StageContext, base: Path) -> tuple[str, dict, dict]:
    where = f"stages[{index}]"
    options: Any
    if isinstance(entry, str):
        kind, options = entry, {}
    elif isinstance(entry, Mapping) and len(entry) == 1:
        kind, options = next(iter(entry.items()))
        options = options or {}
    else:
        raise RecipeError(f"{where}: expected a stage name or {{name: {{options}}}}, got {entry!r}")
    passes = registered_passes()
    if kind not in passes:
        raise RecipeError(f"{where}: unknown stage {kind!r}; stages are: {', '.join(passes)}")
    if not isinstance(options, Mapping):
        raise RecipeError(f"{where}.{kind}: expected a mapping of options, got {options!r}")
    pass_cls = passes[kind]
    graph = {k: options[k] for k in _STAGE_KEYS if k in options}
    values = {k: v for k, v in options.items() if k not in _STAGE_KEYS}
    for field_name, item in pass_cls.fills.items():
        value = context.value(item)
        if field_name not in values and value is not None and value != {} and value is not False:
            values[field_name] = _fill_value(value)
    return kind, graph, pass_cls.from_recipe(values, context, f"{where}.{kind}")


def _check_name(name: Any, where: str, taken: set[str]) -> str:
    if not isinstance(name, str) or not name or not name.replace("_", "a").replace("-", "a").isalnum():
        raise RecipeError(f"{where}.name: {name!r} must be letters, digits, '-' or '_'")
    if name in taken or name == SOURCE:
        raise RecipeError(f"{where}.name: {name!r} is used twice")
    return name


def _check_packaging_last(pass_cls: type[Pass], inputs: list[str], earlier: list[StageSpec], where: str) -> None:
    """Packaging (merge) runs last: a stage downstream of it would also rewrite the merged pre- and
    post-processing (quantize its Resize and Softmax, prune its blocks), which no merge parity covers."""
    if pass_cls.phase is Phase.PACKAGING:
        return
    by_name = {s.name: s for s in earlier}
    todo, seen = [i for i in inputs if i != SOURCE and not is_file_input(i)], set()
    while todo:
        spec = by_name[todo.pop()]
        if spec.name in seen:
            continue
        seen.add(spec.name)
        if spec.pass_cls.phase is Phase.PACKAGING:
            raise RecipeError(
                f"{where}: {pass_cls.name} comes after {spec.name} ({spec.kind}), which merges pre/post-processing "
                f"into the graph; {pass_cls.name} would then rewrite those blocks too",
                hint=f"put {spec.name} last: {pass_cls.name} first, then {spec.kind}")
        todo.extend(i for i in spec.inputs if i != SOURCE and not is_file_input(i))


def _stages(raw: list, context: StageContext, base: Path, model_is_onnx: bool) -> tuple[StageSpec, ...]:
    parsed = [_stage(entry, i, context, base) for i, entry in enumerate(raw)]
    kinds = [kind for kind, _, _ in parsed]
    if kinds.count("export") > 1 or ("export" in kinds and kinds[0] != "export"):
        raise RecipeError("recipe: 'export' may appear once, as the first stage")
    counters: dict[str, int] = {}
    taken: set[str] = set()
    stages: list[StageSpec] = []
    for index, (kind, graph, values) in enumerate(parsed):
        where = f"stages[{index}].{kind}"
        counters[kind] = counters.get(kind, 0) + 1
        default_name = kind if kinds.count(kind) == 1 else f"{kind}{counters[kind]}"
        name = _check_name(graph.get("name", default_name), where, taken)
        taken.add(name)
        previous = stages[-1].name if stages else SOURCE
        pass_cls = registered_passes()[kind]
        # A stage that reads the framework model and a graph (distill) takes [source, previous] by default.
        default = [SOURCE if a is Artifact.SOURCE else previous for a in pass_cls.consumes] \
            if len(pass_cls.consumes) > 1 and not pass_cls.variadic else [previous]
        inputs_raw = graph.get("inputs", default)
        if isinstance(inputs_raw, str):
            inputs_raw = [inputs_raw]
        if not isinstance(inputs_raw, list) or not inputs_raw or not all(isinstance(i, str) for i in inputs_raw):
            raise RecipeError(f"{where}.inputs: expected a list of stage names (or '{SOURCE}')")
        known = {s.name: s for s in stages}
        inputs_raw = [_file_input(item, base) if item not in known else item for item in inputs_raw]
        for item in inputs_raw:
            if item != SOURCE and item not in known and not is_file_input(item):
                raise RecipeError(f"{where}.inputs: {item!r} is not an earlier stage; earlier: "
                                  f"{', '.join([SOURCE, *known]) }")
        wanted_kinds = pass_cls.consumes * len(inputs_raw) if pass_cls.variadic else pass_cls.consumes
        if len(inputs_raw) != len(wanted_kinds):
            raise RecipeError(f"{where}.inputs: {kind} takes {len(pass_cls.consumes)} input(s), got {len(inputs_raw)}")
        _check_packaging_last(pass_cls, inputs_raw, stages, where)
        for item, wanted in zip(inputs_raw, wanted_kinds, strict=True):
            produced = Artifact.ONNX if item != SOURCE or model_is_onnx else Artifact.SOURCE
            if wanted is Artifact.ONNX and produced is not Artifact.ONNX:
                raise RecipeError(f"{where}: a non-ONNX model needs an 'export' stage first",
                                  hint=f"add 'export' before {kind}, or point 'model' at an .onnx file")
            if wanted is Artifact.SOURCE and item != SOURCE:
                raise RecipeError(f"{where}: {kind} reads the recipe's model ('{SOURCE}'), not {item!r}")
        for item in pass_cls.reads:
            if context.value(item) is None:
                raise RecipeError(f"recipe: the {kind} stage needs '{item}' data")
        config = codec.decode_dataclass(pass_cls.config_cls, values, where, base)
        stages.append(StageSpec(kind, config, name, tuple(inputs_raw)))
    return tuple(stages)


def is_file_input(item: str) -> bool:
    """A stage input that names an .onnx file rather than an earlier stage (``inputs: [pruned.onnx]``)."""
    return item.endswith(".onnx") and os.path.isabs(item)


def _file_input(item: Any, base: Path) -> Any:
    """``inputs:`` may name an existing .onnx file (relative to the recipe) instead of a stage."""
    if not isinstance(item, str) or item == SOURCE or not item.endswith(".onnx"):
        return item
    path = Path(item) if Path(item).is_absolute() else base / item
    if not path.is_file():
        raise RecipeError(f"inputs: {item!r} is neither an earlier stage nor an existing .onnx file")
    return str(path.resolve())


def _model_ref(model: Any, base: Path, source: str) -> str:
    if not isinstance(model, str):
        raise RecipeError(f"{source}: 'model' must be a string")
    if model.startswith("builtin:"):
        return model
    spec = parse_source(model)
    resolved = spec.path if spec.path.is_absolute() else base / spec.path
    if not resolved.exists():
        raise RecipeError(f"{source}: model file {resolved} does not exist")
    return str(SourceSpec(resolved, spec.callable))


def recipe_from_mapping(data: Any, base: Path, source: str = "recipe") -> Recipe:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: expected a YAML mapping at the top level")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_TOP_KEYS))}")
    if "model" not in data:
        raise RecipeError(f"{source}: 'model' is required (file.py:callable, .onnx, .pt, .keras, builtin:NAME, "
                          "a Hugging Face folder)")
    model = _model_ref(data["model"], base, source)
    target = codec.decode(str, data.get("target", "cpu"), "target", base)
    if target not in TARGETS:
        raise RecipeError(f"{source}: target {target!r} is not one of {', '.join(TARGETS)}")
    input_shapes, input_dtypes, dynamic_axes = _inputs(data, base, source)
    context = StageContext(
        target=target,
        calibration=codec.decode(DataSpec | None, data.get("calibration"), "calibration", base),
        eval_data=codec.decode(DataSpec | None, data.get("eval"), "eval", base),
        input_shapes=input_shapes,
        dynamic_batch=codec.decode(bool, data.get("dynamic_batch", False), "dynamic_batch", base),
        max_samples=codec.decode(int | None, data.get("max_samples"), "max_samples", base),
        input_dtypes=input_dtypes,
        dynamic_axes=dynamic_axes,
    )
    if context.max_samples is not None and context.max_samples < 1:
        raise RecipeError(f"{source}: max_samples must be at least 1, got {context.max_samples}")
    stages_raw = data.get("stages", ["export", "simplify", "quantize"])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list")
    stages = _stages(stages_raw, context, base, model.endswith(".onnx"))
    search = data.get("search")
    if search is not None and not isinstance(search, Mapping):
        raise RecipeError(f"{source}: 'search' must be a mapping of optimize options")
    name = data.get("name", "run")
    if not isinstance(name, str):
        raise RecipeError(f"{source}: 'name' must be a string")
    return Recipe(
        model=model,
        stages=stages,
        calibration=context.calibration,
        eval_data=context.eval_data,
        target=target,
        input_shapes=context.input_shapes,
        dynamic_batch=context.dynamic_batch,
        input_dtypes=context.input_dtypes,
        dynamic_axes=context.dynamic_axes,
        max_samples=context.max_samples,
        name=_plain_name(name, source),
        search=dict(search) if search else None,
        tune_session=codec.decode(bool, data.get("tune_session", False), "tune_session", base),
    )


def _inputs(data: Mapping[str, Any], base: Path, source: str) -> tuple[dict, dict, dict]:
    """(input_shapes, input_dtypes, dynamic_axes) from ``input_shapes:`` and ``inputs:`` together."""
    shapes = dict(codec.decode(Mapping[str, tuple[int, ...]], data.get("input_shapes", {}), "input_shapes", base))
    inputs = codec.decode(Mapping[str, InputDecl], data.get("inputs", {}), "inputs", base)
    for name, decl in inputs.items():
        if decl.shape is None:
            continue
        if name in shapes and tuple(shapes[name]) != decl.shape:
            raise RecipeError(f"{source}: inputs.{name}.shape {list(decl.shape)} differs from input_shapes.{name} "
                              f"{list(shapes[name])}", hint="give the shape once, under inputs")
        shapes[name] = decl.shape
    dtypes = {name: np.dtype(decl.dtype) for name, decl in inputs.items() if decl.dtype is not None}
    axes = {name: dict(decl.dynamic) for name, decl in inputs.items() if decl.dynamic}
    return shapes, dtypes, axes


def _plain_name(value: Any, source: str) -> str:
    """A run's name is the folder it runs into under runs/: one plain path component."""
    name = str(value)
    if (not name or name in (".", "..") or any(c in name for c in "/\\\0") or os.path.isabs(name)
            or len(os.fsencode(name)) > 255):
        raise RecipeError(f"{source}: name {name!r} must be a plain name (no '/', '\\' or '..'): "
                          "it names the run folder runs/<name>")
    return name


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid YAML ({type(e).__name__})") from e
    return recipe_from_mapping(data, path.parent.resolve(), str(path))
