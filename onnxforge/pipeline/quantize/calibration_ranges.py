"""Activation ranges for static quantization, collected one batch at a time.

onnxruntime's ``quantize_static`` calibrates by running every batch the reader gives and keeping
*all* their intermediate activations before reducing them: memory grows with the data set
(100+ GB on BERT with Percentile, onnxruntime#10503), and the histogram methods (Entropy,
Percentile, Distribution) stack those activations with ``np.asarray``, which fails with
"inhomogeneous shape" when batches differ in shape (token sequences of different lengths).

Here the same onnxruntime calibrator (``create_calibrator``) is handed one batch per
``collect_data`` call. MinMax merges each batch's min/max into its running range; the histogram
calibrators merge each batch's histogram into theirs (widening the bins when a batch exceeds
them). Memory thus holds one batch's activations, and every method accepts batches of any
shape. Under a memory limit (memory_plan) calibration also streams by tensor: several passes over
the data, each calibrating a share of the tensors (ranges are per tensor, so they are the same).
The ranges are written as onnxruntime's JSON calibration cache, which ``quantize_static`` reads
instead of calibrating again (``calibration_cache_path``), once per candidate.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import CalibraterBase, TensorsData, create_calibrator, save_tensors_data

from onnxforge.pipeline.quantize.memory_plan import balanced_shares

__all__ = ["collect_ranges"]


class _OneBatch(CalibrationDataReader):
    def __init__(self, batch: Mapping[str, np.ndarray]) -> None:
        self._batch: Mapping[str, np.ndarray] | None = batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch, self._batch = self._batch, None
        return dict(batch) if batch is not None else None


class _EmptyShare(Exception):
    """A pass whose share of the tensors is empty (more passes than tensors)."""


@contextlib.contextmanager
def _only(group: int, groups: int, sizes: Mapping[str, int]) -> Iterator[None]:
    """While creating a calibrator: calibrate only the ``group``-th of ``groups`` shares of the tensors."""
    original = CalibraterBase.select_tensors_to_calibrate

    def select(self, model):
        tensors, value_infos = original(self, model)
        share = balanced_shares(tensors, groups, sizes)[group]
        if not share:
            raise _EmptyShare
        return share, value_infos

    CalibraterBase.select_tensors_to_calibrate = select
    try:
        yield
    finally:
        CalibraterBase.select_tensors_to_calibrate = original


def _low_memory_session(calibrator) -> None:
    """The calibrator's session again, without onnxruntime's CPU arena (memory returns after each batch)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    calibrator.infer_session = ort.InferenceSession(
        calibrator.augmented_model_path, sess_options=options, providers=calibrator.execution_providers
    )


def collect_ranges(
    model_path: str | os.PathLike,
    batches: Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable[Mapping[str, np.ndarray]]],
    method: CalibrationMethod,
    cache_path: str | os.PathLike,
    *,
    op_types: Sequence[str] | None = None,
    tensor_groups: int = 1,
    tensor_sizes: Mapping[str, int] | None = None,
    low_memory: bool = False,
) -> int:
    """Calibrate ``model_path`` on ``batches`` with ``method``; write the cache; return the batch count.

    ``tensor_groups`` > 1 streams by tensor as well as by batch: that many passes over the data (then
    ``batches`` is a callable giving a fresh iterable), each calibrating a share of the tensors
    (balanced by ``tensor_sizes``, bytes per sample, when given), so the calibrator holds a share of a
    batch's activations. Ranges are per tensor: the result is the same. ``low_memory``: the
    calibrator's session runs without onnxruntime's arena.
    """
    if tensor_groups > 1 and not callable(batches):
        raise TypeError("several passes over the tensors need a callable that gives the batches again")
    merged: dict = {}
    count = 0
    for group in range(tensor_groups):
        share = _only(group, tensor_groups, tensor_sizes or {}) if tensor_groups > 1 else contextlib.nullcontext()
        try:
            ranges, count = _one_pass(model_path, batches() if callable(batches) else batches, method, op_types,
                                      share, low_memory)
        except _EmptyShare:  # more passes than tensors: nothing left for this one
            continue
        merged.update(ranges)
    save_tensors_data(TensorsData(method, merged), Path(cache_path))
    return count


def _one_pass(
    model_path, batches: Iterable[Mapping[str, np.ndarray]], method: CalibrationMethod, op_types, share,
    low_memory: bool,
) -> tuple[dict, int]:
    """(ranges of the tensors ``share`` selects, batches run): one calibrator, fed one batch at a time."""
    count = 0
    with tempfile.TemporaryDirectory(prefix="onnxforge-calib-") as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), share:
            calibrator = create_calibrator(
                Path(model_path),
                list(op_types) if op_types else None,
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=method,
                extra_options={"moving_average": False},
            )
        try:
            if low_memory:
                _low_memory_session(calibrator)
            # the histogram calibrators print a line per collect_data call
            with contextlib.redirect_stdout(io.StringIO()):
                for batch in batches:
                    calibrator.collect_data(_OneBatch(batch))
                    count += 1
                if count == 0:
                    raise ValueError("no calibration batch")
                ranges = calibrator.compute_data()
        finally:
            del calibrator
    return dict(ranges.data), count
