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
shape. The ranges are written as onnxruntime's JSON calibration cache, which ``quantize_static``
reads instead of calibrating again (``calibration_cache_path``), once per candidate.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

__all__ = ["collect_ranges"]


class _OneBatch(CalibrationDataReader):
    def __init__(self, batch: Mapping[str, np.ndarray]) -> None:
        self._batch: Mapping[str, np.ndarray] | None = batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch, self._batch = self._batch, None
        return dict(batch) if batch is not None else None


def collect_ranges(
    model_path: str | os.PathLike,
    batches: Iterable[Mapping[str, np.ndarray]],
    method: CalibrationMethod,
    cache_path: str | os.PathLike,
    *,
    op_types: Sequence[str] | None = None,
) -> int:
    """Calibrate ``model_path`` on ``batches`` with ``method``; write the cache; return the batch count."""
    count = 0
    with tempfile.TemporaryDirectory(prefix="onnxforge-calib-") as tmp:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            calibrator = create_calibrator(
                Path(model_path),
                list(op_types) if op_types else None,
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=method,
                extra_options={"moving_average": False},
            )
        try:
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
    save_tensors_data(ranges, Path(cache_path))
    return count
