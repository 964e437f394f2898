"""Pipeline recipes: a YAML file naming the model, its data and the stages to run.

```yaml
model: model.py:build          # or model.onnx, model.pt, model.keras, builtin:digits_cnn
input_shapes: {image: [1, 1, 32, 32]}
dynamic_batch: true
calibration: calib.npz         # arrays keyed by input name, first axis = samples
eval: eval.npz                 # held-out samples (+ 'label' for accuracy)
target: cpu
stages:
  - export
  - simplify
  - prune_channels: {ratio: 0.5}   # structured: really smaller Convs, repaired by least squares
  - quantize: {tolerance: 0.5}
```

Stages: export, simplify, prune (magnitude sparsity), prune_channels, low_rank, quantize, fp16.

Relative paths are relative to the recipe's folder. Unknown keys, wrong types and missing files
are RecipeError (exit 2) naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from onnxforge.converters.config import ExportConfig
from onnxforge.errors import OnnxForgeError, RecipeError
from onnxforge.parity import Tolerance
from onnxforge.pipeline.fp16 import Fp16Config
from onnxforge.pipeline.low_rank import LowRankConfig
from onnxforge.pipeline.prune_channels import ChannelPruneConfig
from onnxforge.pipeline.prune_magnitude import MagnitudePruneConfig
from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme
from onnxforge.pipeline.simplify import SimplifyConfig
from onnxforge.targets import TARGETS, QuantScheme

__all__ = ["Recipe", "StageSpec", "STAGE_CONFIGS", "load_recipe", "config_from_mapping"]

STAGE_CONFIGS: dict[str, type] = {
    "export": ExportConfig,
    "simplify": SimplifyConfig,
    "prune": MagnitudePruneConfig,
    "quantize": QuantizeConfig,
    "fp16": Fp16Config,
    "prune_channels": ChannelPruneConfig,
    "low_rank": LowRankConfig,
}
_TOP_KEYS = {"model", "input_shapes", "dynamic_batch", "calibration", "eval", "target", "stages", "name"}


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: Any
    name: str


@dataclass(frozen=True)
class Recipe:
    model: str
    stages: tuple[StageSpec, ...]
    calibration: Path | None = None
    eval_data: Path | None = None
    target: str = "cpu"
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    dynamic_batch: bool = False
    name: str = "run"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "calibration": str(self.calibration) if self.calibration else None,
            "eval": str(self.eval_data) if self.eval_data else None,
            "target": self.target,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "dynamic_batch": self.dynamic_batch,
            "stages": [{"kind": s.kind, "name": s.name, "config": s.config.to_json()} for s in self.stages],
        }


def _convert(value: Any, annotation: Any, where: str, base: Path) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where, base)
            except RecipeError as e:
                errors.append(e.message)
        raise RecipeError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [m.value for m in annotation]
        if value not in choices:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return annotation(value)
    if annotation is Path:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a file path, got {type(value).__name__}")
        path = Path(value) if os.path.isabs(value) else base / value
        if not path.exists():
            raise RecipeError(f"{where}: file {path} does not exist")
        return path
    if annotation is QuantScheme:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a scheme name such as qdq-u8s8-per-channel, got {value!r}")
        try:
            return parse_scheme(value)
        except OnnxForgeError as e:
            raise RecipeError(f"{where}: {e.message}") from e
    if annotation is np.dtype:
        try:
            return np.dtype(value)
        except TypeError:
            raise RecipeError(f"{where}: unknown dtype {value!r}") from None
    if annotation is Tolerance:
        if not isinstance(value, Mapping) or set(value) - {"atol", "rtol"}:
            raise RecipeError(f"{where}: expected {{atol: ..., rtol: ...}}")
        return Tolerance(**{k: _convert(v, float, f"{where}.{k}", base) for k, v in value.items()})
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if annotation is int and not float(value).is_integer():
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return annotation(value)
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{where}[{i}]", base) for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.get_origin(Mapping[str, int])):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args if args else (Any, Any)
        return {_convert(k, key_t, where, base): _convert(v, val_t, f"{where}.{k}", base) for k, v in value.items()}
    if annotation is Any:
        return value
    raise RecipeError(f"{where}: this key cannot be set from a recipe")


def config_from_mapping(cls: type, values: Mapping[str, Any], where: str, base: Path = Path(".")) -> Any:
    """Build the frozen config dataclass ``cls`` from recipe values, checking keys and types."""
    if not isinstance(values, Mapping):
        raise RecipeError(f"{where}: expected a mapping of options, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields))}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}", base) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except OnnxForgeError as e:
        raise RecipeError(f"{where}: {e.message}") from e
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from e


def _stage(entry: Any, index: int, defaults: Mapping[str, Mapping[str, Any]], base: Path) -> StageSpec:
    where = f"stages[{index}]"
    if isinstance(entry, str):
        kind, options = entry, {}
    elif isinstance(entry, Mapping) and len(entry) == 1:
        kind, options = next(iter(entry.items()))
        options = options or {}
    else:
        raise RecipeError(f"{where}: expected a stage name or {{name: {{options}}}}, got {entry!r}")
    if kind not in STAGE_CONFIGS:
        raise RecipeError(f"{where}: unknown stage {kind!r}; stages are: {', '.join(STAGE_CONFIGS)}")
    if not isinstance(options, Mapping):
        raise RecipeError(f"{where}.{kind}: expected a mapping of options, got {options!r}")
    merged = {**defaults.get(kind, {}), **options}
    return StageSpec(kind, config_from_mapping(STAGE_CONFIGS[kind], merged, f"{where}.{kind}", base), kind)


def recipe_from_mapping(data: Any, base: Path, source: str = "recipe") -> Recipe:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: expected a YAML mapping at the top level")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_TOP_KEYS))}")
    if "model" not in data:
        raise RecipeError(f"{source}: 'model' is required (file.py:callable, .onnx, .pt, .keras, builtin:NAME)")
    model = data["model"]
    if not isinstance(model, str):
        raise RecipeError(f"{source}: 'model' must be a string")
    if not model.startswith("builtin:"):
        file_part = model.rpartition(":")[0] if model.rpartition(":")[0].endswith(".py") else model
        resolved = Path(file_part) if os.path.isabs(file_part) else base / file_part
        if not resolved.exists():
            raise RecipeError(f"{source}: model file {resolved} does not exist")
        model = str(resolved) + (model[len(file_part):] if file_part != model else "")
    shapes = _convert(data.get("input_shapes", {}), Mapping[str, tuple[int, ...]], "input_shapes", base)
    dynamic = _convert(data.get("dynamic_batch", False), bool, "dynamic_batch", base)
    calibration = _convert(data.get("calibration"), Path | None, "calibration", base)
    eval_data = _convert(data.get("eval"), Path | None, "eval", base)
    target = _convert(data.get("target", "cpu"), str, "target", base)
    if target not in TARGETS:
        raise RecipeError(f"{source}: target {target!r} is not one of {', '.join(TARGETS)}")
    stages_raw = data.get("stages", ["export", "simplify", "quantize"])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list")
    defaults: dict[str, dict[str, Any]] = {
        "export": {"input_shapes": {k: list(v) for k, v in shapes.items()}, "dynamic_batch": dynamic},
        "simplify": {"input_shapes": {k: list(v) for k, v in shapes.items()}},
        "fp16": {"input_shapes": {k: list(v) for k, v in shapes.items()}},
        "quantize": {"target": target} | ({"eval_data": str(eval_data)} if eval_data else {}),
        "prune": {"eval_data": str(eval_data)} if eval_data else {},
    }
    # Channel pruning and low-rank repair/choose ranks with the calibration data, gate on eval data.
    for kind in ("prune_channels", "low_rank"):
        defaults[kind] = ({"calibration_data": str(calibration)} if calibration else {}) | (
            {"eval_data": str(eval_data)} if eval_data else {}
        )
    stages = tuple(_stage(entry, i, defaults, base) for i, entry in enumerate(stages_raw))
    kinds = [s.kind for s in stages]
    if kinds.count("export") > 1 or ("export" in kinds and kinds[0] != "export"):
        raise RecipeError(f"{source}: 'export' may appear once, as the first stage")
    if "quantize" in kinds and calibration is None:
        raise RecipeError(f"{source}: the quantize stage needs 'calibration' data")
    if "export" not in kinds and not model.endswith(".onnx"):
        raise RecipeError(f"{source}: a non-ONNX model needs an 'export' stage first")
    names: dict[str, int] = {}
    named = []
    for spec in stages:
        names[spec.kind] = names.get(spec.kind, 0) + 1
        label = spec.kind if kinds.count(spec.kind) == 1 else f"{spec.kind}{names[spec.kind]}"
        named.append(StageSpec(spec.kind, spec.config, label))
    return Recipe(
        model=model,
        stages=tuple(named),
        calibration=calibration,
        eval_data=eval_data,
        target=target,
        input_shapes=shapes,
        dynamic_batch=dynamic,
        name=_plain_name(data.get("name", "run"), source),
    )


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
