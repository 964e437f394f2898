"""``onnxforge demo``: the whole pipeline on the built-in digits CNN with real data.

Writes the data it uses (calibration from the training split, evaluation = the held-out split
with labels) and a ``recipe.yaml`` into the run folder, so ``onnxforge run RUN_DIR/recipe.yaml``
repeats it; then runs export -> simplify -> prune_channels (half the channels removed, the
layers after each cut refit by least squares on the calibration data) -> quantize -> merge (the
deployable graph: uint8 digit images [N, 32, 32, 1] in, ``label`` and ``score`` out), and measures
every stage. The merged graph takes raw pixels, not the evaluation floats, so the merge stage
measures itself on the evaluation images turned back into uint8.

The demo shows the work it does: its stage cache is private to the run folder (``RUN_DIR/.cache``),
not the user cache every other command shares, so a first run computes every stage even where
another checkout or an earlier run filled the shared cache. Running it again into the same folder
re-uses that folder's stages, and each one says where it came from and when it was computed. A
caller who wants the shared cache passes it (``cache=StageCache.default()``, ``--cache-dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from onnxforge._atomic import atomic_path, atomic_write_text
from onnxforge.datasets import DIGITS_INPUT_NAME, load_digits_split
from onnxforge.pipeline.cache import StageCache
from onnxforge.pipeline.progress import Progress
from onnxforge.pipeline.recipe import load_recipe
from onnxforge.pipeline.runner import RunResult, run_recipe

__all__ = ["CACHE_DIR", "DEMO_RECIPE", "demo"]

CALIBRATION_SAMPLES = 256
CACHE_DIR = ".cache"  # inside the run folder: the demo's own stage cache

DEMO_RECIPE = {
    "name": "digits-cnn-demo",
    "model": "builtin:digits_cnn",
    "dynamic_batch": True,
    "calibration": "data/calibration.npz",
    "eval": "data/eval.npz",
    "target": "cpu",
    "stages": [
        "export",
        "simplify",
        {"prune_channels": {"ratio": 0.5}},
        {"quantize": {"tolerance": 0.5}},
        {"merge": {"pre": {"image": {"layout": "hwc"}}, "post": "argmax"}},
    ],
}


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=True, **arrays)  # the default, named so that mypy does not bind **arrays to it


def demo(
    run_dir: str | os.PathLike = "runs/demo",
    *,
    force: bool = False,
    progress: Progress | None = None,
    cache: StageCache | None = None,
) -> RunResult:
    """Run the demo recipe into ``run_dir``; ``cache``: default ``run_dir/.cache`` (see the module docstring)."""
    run_dir = Path(run_dir)
    if cache is None:
        cache = StageCache(run_dir / CACHE_DIR)
    split = load_digits_split()
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    # Calibration: a fixed slice of the training split; evaluation: the held-out split, never seen.
    _save_npz(data / "calibration.npz", **{DIGITS_INPUT_NAME: split.train_images[:CALIBRATION_SAMPLES]})
    _save_npz(data / "eval.npz", **{DIGITS_INPUT_NAME: split.test_images, "label": split.test_labels})
    recipe_path = run_dir / "recipe.yaml"
    atomic_write_text(recipe_path, yaml.safe_dump(DEMO_RECIPE, sort_keys=False))
    return run_recipe(load_recipe(recipe_path), run_dir, force=force, progress=progress, cache=cache)
