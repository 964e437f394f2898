"""The files a recipe run reads and writes, checked against each other before the first stage runs.

A run writes ``NN_<stage>.onnx`` per stage, ``manifest.json`` and ``report.html`` into its run
folder. None of them may be a file the recipe reads — its model (say ``02_quantize.onnx`` kept in
the run folder from an earlier run), that model's external data, the ``.py`` it is built from, the
calibration and evaluation data — or the run would overwrite its own input. Such a run is refused
(exit 2) before any stage runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.converters.source import source_files
from onnxforge.errors import OutputPathError, RecipeError
from onnxforge.pipeline.recipe import Recipe, is_file_input

__all__ = ["check_run_paths", "recipe_reads", "run_outputs", "run_paths", "stage_output"]


def recipe_reads(recipe: Recipe) -> list[Path]:
    """The files and folders a run of ``recipe`` reads: model source, calibration, eval and stage data."""
    reads: list[str | os.PathLike | None] = [
        *source_files(recipe.model), *(spec.path for spec in (recipe.calibration, recipe.eval_data) if spec)]
    for spec in recipe.stages:
        reads += paths_in(spec.config)
        reads += [item for item in spec.inputs if is_file_input(item)]
    return [Path(p) for p in reads if p is not None]


def stage_output(run_dir: str | os.PathLike, index: int, name: str) -> Path:
    """Where the runner writes stage ``index`` (from 1) named ``name``: ``NN_<name>.onnx``."""
    return Path(run_dir) / f"{index:02d}_{name}.onnx"


def run_outputs(recipe: Recipe, run_dir: str | os.PathLike) -> list[Path]:
    """The files a run writes into ``run_dir``."""
    stages = [stage_output(run_dir, index, spec.name) for index, spec in enumerate(recipe.stages, start=1)]
    return [*stages, Path(run_dir) / "manifest.json", Path(run_dir) / "report.html"]


def run_paths(recipe: Recipe, run_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(files read, files written) by a run of ``recipe`` into ``run_dir``."""
    return recipe_reads(recipe), run_outputs(recipe, run_dir)


def check_run_paths(recipe: Recipe, run_dir: str | os.PathLike) -> None:
    """Raise RecipeError (exit 2) when a file the run writes is, or aliases, a file it reads."""
    reads, writes = run_paths(recipe, run_dir)
    for output in writes:
        try:
            check_output_path(output, *reads)
        except OutputPathError as e:
            raise RecipeError(f"run folder {run_dir}: {e.message}",
                              hint="choose another run folder (-o), or move the recipe's files out of it") from e
