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

__all__ = ["check_run_paths", "check_search_paths", "recipe_reads", "run_outputs", "run_paths", "stage_output"]


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


# ----------------------------------------------------------------------------------------------
# ``optimize``'s run folder: the same rule, plus "only into a folder of its own"

SEARCH_MARKER = "search.json"  # written first by every search: the folder is a search's run folder
# what a search writes at the top of its run folder (folders: trials/, front/)
SEARCH_OUTPUTS = frozenset({SEARCH_MARKER, "study.log", "input_export.onnx", "input_simplified.onnx", "pareto.json",
                            "manifest.json", "report.html", "best.onnx", "best.recipe.yaml", "best.session.json",
                            "trials", "front"})


def _written_by_search(name: str) -> bool:
    return name in SEARCH_OUTPUTS or (name.startswith(".") and name.endswith(".tmp"))  # an atomic write's leftover


def check_search_paths(model: str | os.PathLike, reads: list[Path], run_dir: str | os.PathLike, *,
                       json_path: str | os.PathLike | None = None) -> None:
    """Refuse (OutputPathError, exit 2) a search that would overwrite or delete what it did not write.

    ``model``: the search's input (an .onnx or a framework source); ``reads``: its other inputs (data
    files, a recipe). ``run_dir`` may not hold any input, and when it exists with files in it, they must
    be a search's own (its ``search.json`` marker, or only names a search writes: an interrupted first
    run). ``json_path`` (the report) may not be an input, nor a file the search writes.
    """
    run = Path(run_dir)
    inputs = [*(Path(p) for p in source_files(str(model))), *reads]
    for read in inputs:
        if run.is_dir() and _inside_folder(read, run):
            raise OutputPathError(f"run folder {run} holds {read}, an input of this search; "
                                  "onnxforge never overwrites its inputs", hint="choose another run folder (-o)")
    if run.is_dir() and not (run / SEARCH_MARKER).is_file():
        foreign = sorted(p.name for p in run.iterdir() if not _written_by_search(p.name))
        if foreign:
            raise OutputPathError(f"run folder {run} holds files onnxforge did not write ({foreign[0]}"
                                  + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "") + ")",
                                  hint="choose a new or empty folder (-o), or an earlier optimize run's folder")
    if json_path is not None and str(json_path) != "-":
        outputs = [run / name for name in SEARCH_OUTPUTS]
        try:
            check_output_path(json_path, *inputs, written=outputs, stream_ok=True)
            if _inside_folder(Path(json_path), run / "trials") or _inside_folder(Path(json_path), run / "front"):
                raise OutputPathError(f"output path {json_path} is inside the run folder's trials/ or front/")
        except OutputPathError as e:
            raise OutputPathError(f"--json: {e.message}", hint=e.hint) from e


def _inside_folder(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
