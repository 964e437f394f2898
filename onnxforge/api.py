"""The Python API: the same one-stage recipes the commands run, returning the stage's record.

    import onnxforge
    record = onnxforge.quantize("model.onnx", "model.int8.onnx", calibration="calib.npz", eval="eval.npz")
    record.result["chosen"], record.status        # 'qdq-u8s8-per-channel', 'done' (or 'cached')

Options are the pass's config fields, given as Python values (``tolerance=0.5``,
``importance=Importance.ACTIVATION`` or ``"activation"``; ``metric="my_metric.py:score"`` is a user metric:
onnxforge.pipeline.user_metric). Each call builds the recipe the matching command
builds and runs it through the runner: same cache, same gates, byte-identical output. A quality gate that
no try meets raises ``QualityGateError`` (exit 4 on the command line): ``e.result`` holds every try's
numbers, ``e.best_path`` the best model kept (if any), ``e.record`` the stage record.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxforge.pipeline import codec
from onnxforge.pipeline.cache import StageCache
from onnxforge.pipeline.command_run import CommandRecipe, run_to_output
from onnxforge.pipeline.manifest import StageRecord

__all__ = ["fp16", "low_rank", "magnitude", "merge", "prune", "prune_channels", "quantize", "run_stage", "simplify"]

PathLike = str | os.PathLike[str]
CacheArg = StageCache | PathLike | bool | None


def _cache(cache: CacheArg) -> StageCache:
    if isinstance(cache, StageCache):
        return cache
    if cache is False:
        return StageCache(None)
    if cache is None or cache is True:
        return StageCache.default()
    return StageCache(cache)


def run_stage(
    kind: str,
    model: PathLike,
    output: PathLike,
    *,
    calibration: Any = None,
    eval: Any = None,
    target: str | None = None,
    max_samples: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    inputs: Sequence[PathLike] | None = None,
    cache: CacheArg = None,
    force: bool = False,
    tune_session: bool = False,
    **options: Any,
) -> StageRecord:
    """Run one registered pass ``kind`` on ``model`` into ``output``, as ``onnxforge run`` would run a
    one-stage recipe with these data, target and options; returns its record (status ``done``/``cached``).
    ``tune_session``: also write ``output``'s measured session options beside it (``onnxforge.tune_session``)."""
    stage_options = {name: codec.encode(value) for name, value in options.items()}
    if inputs:
        stage_options["inputs"] = [str(Path(p).resolve()) for p in inputs]
    command = CommandRecipe.build(model, [(kind, stage_options)], calibration=calibration, eval_data=eval,
                                  target=target, input_shapes=input_shapes, max_samples=max_samples,
                                  tune_session=tune_session)
    return run_to_output(command.recipe(), output, cache=_cache(cache), force=force)[-1]


def quantize(model: PathLike, output: PathLike, *, calibration: Any, **options: Any) -> StageRecord:
    """``onnxforge quantize``: the target's candidate schemes measured; the fastest within tolerance kept."""
    return run_stage("quantize", model, output, calibration=calibration, **options)


def prune_channels(model: PathLike, output: PathLike, **options: Any) -> StageRecord:
    """``onnxforge prune --method channels``: whole channels removed, the next layers refit by least squares."""
    return run_stage("prune_channels", model, output, **options)


def low_rank(model: PathLike, output: PathLike, **options: Any) -> StageRecord:
    """``onnxforge prune --method low-rank``: dense layers factored by (data-aware) SVD."""
    return run_stage("low_rank", model, output, **options)


def magnitude(model: PathLike, output: PathLike, **options: Any) -> StageRecord:
    """``onnxforge prune --method magnitude``: the smallest weights zeroed (smaller compressed, same speed)."""
    return run_stage("prune", model, output, **options)


_PRUNE_METHODS = {"magnitude": "prune", "channels": "prune_channels", "low-rank": "low_rank"}


def prune(model: PathLike, output: PathLike, *, method: str = "magnitude", **options: Any) -> StageRecord:
    """``onnxforge prune``: ``method`` is magnitude, channels or low-rank, as on the command line."""
    if method not in _PRUNE_METHODS:
        from onnxforge.errors import UsageError

        raise UsageError(f"prune: method {method!r} is not one of {', '.join(_PRUNE_METHODS)}")
    return run_stage(_PRUNE_METHODS[method], model, output, **options)


def simplify(model: PathLike, output: PathLike, **options: Any) -> StageRecord:
    """``onnxforge simplify``: onnxsim, onnxslim and onnxruntime; the smallest graph with parity kept."""
    return run_stage("simplify", model, output, **options)


def fp16(model: PathLike, output: PathLike, **options: Any) -> StageRecord:
    """``onnxforge fp16``: fp16 weights and compute, parity checked against fp32."""
    return run_stage("fp16", model, output, **options)


def merge(models: PathLike | Sequence[PathLike], output: PathLike, **options: Any) -> StageRecord:
    """``onnxforge merge``: pre/post-processing (and ensembles of several models) merged into one graph."""
    listed = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    return run_stage("merge", listed[0], output, inputs=listed if len(listed) > 1 else None, **options)
