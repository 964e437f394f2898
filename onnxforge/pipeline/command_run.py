"""A command is a recipe: the one door every CLI command and Python API call goes through.

``onnxforge quantize m.onnx -o q.onnx --calibration c.npz`` is the recipe

```yaml
model: m.onnx
calibration: c.npz
stages: [quantize]
```

run into one file. ``CommandRecipe`` holds that mapping (the recipe spelling, so ``--save-recipe`` writes
exactly what ran), parses it with the same ``recipe_from_mapping`` a YAML recipe goes through, and
``run_to_output`` runs its stages with the runner's ``run_stage``: the same registry, codec, cache key,
quality gates and ``StageRecord`` as ``onnxforge run``. The last stage writes the user's output file;
earlier ones (``prune --distill`` prunes, then distills) write into a private folder beside it that is
removed afterwards. Running the same command twice is answered from the cache, and says so.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onnxforge._atomic import atomic_write_text, check_output_path
from onnxforge.errors import RecipeError, UsageError
from onnxforge.pipeline.cache import StageCache
from onnxforge.pipeline.manifest import StageRecord
from onnxforge.pipeline.progress import Progress, step
from onnxforge.pipeline.recipe import SOURCE, Recipe, recipe_from_mapping
from onnxforge.pipeline.run_guard import recipe_reads, stage_output
from onnxforge.pipeline.runner import StageArtifact, model_artifact, run_stage, stage_inputs
from onnxforge.targets import get_target

__all__ = ["CommandRecipe", "run_to_output", "stage_json"]

# Recipe keys whose values are file paths (absolute in the mapping; relative to the recipe when saved).
_DATA_KEYS = ("calibration", "eval")


@dataclass(frozen=True)
class CommandRecipe:
    """The recipe a command stands for: ``mapping`` is in the recipe's own spelling (paths absolute)."""

    mapping: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        model: str | os.PathLike,
        stages: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        calibration: Any = None,
        eval_data: Any = None,
        target: str | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        dynamic_batch: bool = False,
        max_samples: int | None = None,
        tune_session: bool = False,
    ) -> CommandRecipe:
        """``stages``: ``(kind, options)`` in order, options in the recipe's spelling (codec-encoded)."""
        mapping: dict[str, Any] = {"model": _absolute_model(str(model))}
        for key, value in (("calibration", calibration), ("eval", eval_data)):
            if value is not None:
                mapping[key] = _absolute_data(value)
        if target is not None:
            mapping["target"] = target
        if input_shapes:
            mapping["input_shapes"] = {name: list(dims) for name, dims in input_shapes.items()}
        if dynamic_batch:
            mapping["dynamic_batch"] = True
        if max_samples is not None:
            mapping["max_samples"] = max_samples
        if tune_session:
            mapping["tune_session"] = True
        mapping["stages"] = [{kind: dict(options)} if options else kind for kind, options in stages]
        return cls(mapping)

    def recipe(self) -> Recipe:
        """The parsed recipe: every option checked by the codec, as a YAML recipe's would be."""
        model = self.mapping["model"]
        if not model.startswith("builtin:"):
            from onnxforge.converters.source import parse_source

            source = parse_source(model).path
            if not source.exists():
                raise UsageError(f"{source}: no such file", hint="check the model path")
        for key, flag in (("calibration", "--calibration"), ("eval", "--eval")):
            value = self.mapping.get(key)
            data = value.get("path") if isinstance(value, Mapping) else value
            if data is not None and not os.path.exists(data):
                raise UsageError(f"{flag} {data}: no such file or folder")
        try:
            return recipe_from_mapping(self.mapping, Path.cwd(), "command")
        except RecipeError as e:
            raise UsageError(_as_flags(e.message), hint=e.hint) from e

    def yaml_text(self, folder: Path) -> str:
        """The recipe as YAML, its paths relative to ``folder`` (where the recipe file lives)."""
        mapping = dict(self.mapping)
        mapping["model"] = _relative_model(mapping["model"], folder)
        for key in _DATA_KEYS:
            if key in mapping:
                mapping[key] = _relative_data(mapping[key], folder)
        stages = []
        for entry in mapping["stages"]:
            if isinstance(entry, Mapping):
                (kind, options), = entry.items()
                entry = {kind: {k: _relative_option(v, folder) for k, v in options.items()}}
            stages.append(entry)
        mapping["stages"] = stages
        header = "# written by onnxforge --save-recipe; rerun with: onnxforge run THIS_FILE\n"
        return header + yaml.safe_dump(mapping, sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike, *reads: str | os.PathLike | None) -> Path:
        """Write the recipe to ``path`` atomically (never over a file the command reads)."""
        target = check_output_path(path, *reads)
        atomic_write_text(target, self.yaml_text(target.resolve().parent))
        return target


def run_to_output(
    recipe: Recipe,
    output: str | os.PathLike,
    *,
    cache: StageCache | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> list[StageRecord]:
    """Run ``recipe``'s stages in order, the last one into ``output``; returns every stage's record.

    Raises what a stage raises (a QualityGateError carries its record as ``error.record``).
    """
    output = Path(output)
    check_output_path(output, *recipe_reads(recipe))  # before any work: never over an input
    get_target(recipe.target).require()
    cache = cache if cache is not None else StageCache.default()
    context = recipe.context(progress)
    context.cache = cache
    artifacts: dict[str, StageArtifact] = {SOURCE: model_artifact(recipe.model)}
    records: list[StageRecord] = []
    with tempfile.TemporaryDirectory(prefix=".onnxforge-stages-", dir=output.resolve().parent) as scratch:
        for index, spec in enumerate(recipe.stages, start=1):
            last = index == len(recipe.stages)
            path = output if last else stage_output(scratch, index, spec.name)
            record = run_stage(spec, stage_inputs(spec, artifacts), path, context, cache, force=force)
            records.append(record)
            artifacts[spec.name] = StageArtifact(str(path), record.output_file()["sha256"])
    if recipe.tune_session:
        records[-1] = tune_output(recipe, output, records[-1], context.progress)
    return records


def tune_output(recipe: Recipe, model: Path, record: StageRecord, progress: Progress) -> StageRecord:
    """The recipe's ``tune_session``: session options measured for its final ``model`` (on the eval data's
    first samples, else generated inputs), written beside it when faster twice (``session_tuning``); returns
    the last stage's ``record`` with what was measured under its result's ``session``."""
    from onnxforge.pipeline.session_tuning import tune_session_file

    tuning = tune_session_file(model, recipe.eval_data, recipe.target, input_shapes=recipe.input_shapes,
                               reads=tuple(recipe_reads(recipe)), progress=progress)
    step(progress, "session options",
         message=tuning.summary() + (f"; wrote {Path(tuning.written).name}" if tuning.written else ""))
    return dataclasses.replace(record, result={**(record.result or {}), "session": tuning.to_json()})


def stage_json(records: Sequence[StageRecord]) -> dict[str, Any]:
    """What ``--json`` writes: the stage's result (as before) with its manifest record under ``stage`` (name,
    kind, key, config, cache answer, seconds, output); for several stages, each result under its stage's
    name and every record under ``stages``."""
    if len(records) > 1:  # each stage's result under its name, and the records
        payload: dict[str, Any] = {r.name: r.result for r in records}
        payload["stages"] = [r.to_json() for r in records]
        return payload
    last = records[-1]
    payload = dict(last.result or {})
    payload["stage"] = {k: v for k, v in last.to_json().items() if k != "result"}
    return payload


# ----------------------------------------------------------------------------------------------


def _absolute_model(model: str) -> str:
    if model.startswith("builtin:"):
        return model
    from onnxforge.converters.source import SourceSpec, parse_source

    spec = parse_source(model)
    return str(SourceSpec(Path(os.path.abspath(spec.path)), spec.callable))


def _absolute_data(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {**value, "path": os.path.abspath(value["path"])}
    if isinstance(value, (str, os.PathLike)):
        return os.path.abspath(value)
    from onnxforge.pipeline import codec  # a DataSpec given through the Python API

    return _absolute_data(codec.encode(value))


def _relative(path: str, folder: Path) -> str:
    try:
        return os.path.relpath(path, folder)
    except ValueError:  # another drive on Windows
        return path


def _relative_model(model: str, folder: Path) -> str:
    if model.startswith("builtin:"):
        return model
    from onnxforge.converters.source import SourceSpec, parse_source

    spec = parse_source(model)
    return str(SourceSpec(Path(_relative(str(spec.path), folder)), spec.callable))


def _relative_data(value: Any, folder: Path) -> Any:
    if isinstance(value, Mapping):
        return {**value, "path": _relative(value["path"], folder)}
    return _relative(value, folder)


def _relative_option(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_relative_option(v, folder) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return _relative(value, folder)
    if isinstance(value, Mapping) and isinstance(value.get("path"), str) and os.path.isabs(value["path"]):
        return {**value, "path": _relative(value["path"], folder)}
    return value


def _as_flags(message: str) -> str:
    """A recipe error about a command's own stage, said in the command's terms (``stages[0].quantize.x``
    is the option ``x``)."""
    import re

    return re.sub(r"stages\[\d+\]\.[a-z_]+\.?", "option ", message, count=1).replace("option :", "option:")
