"""Feeding samples to onnxruntime's calibrators: batch size from the model, batches read as they go."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from onnxforge.model_io import TensorSpec
from onnxforge.pipeline.calibration.samples import SampleSet, StreamedSamples

__all__ = ["CalibrationReader", "model_batch_size"]


def model_batch_size(specs: Sequence[TensorSpec], preferred: int) -> int:
    """The batch to feed: the model's fixed first dim if it has one, else ``preferred``."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    return fixed.pop() if len(fixed) == 1 else preferred


class CalibrationReader(CalibrationDataReader):
    """Feeds samples to onnxruntime's calibrators in batches, reading them as it goes.

    With ``fixed_batch`` (a model whose batch dim is fixed) a short batch is dropped, since the
    model cannot take it; otherwise short batches (a data set's tail, or a group of
    equal-length sequences) are fed as they are.
    """

    def __init__(self, samples: SampleSet | StreamedSamples, batch_size: int, *, fixed_batch: bool = True) -> None:
        self._samples = samples
        self._batch_size = batch_size
        self._fixed_batch = fixed_batch
        self._iter: Iterator[Mapping[str, np.ndarray]] | None = None
        self.batches_read = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = iter(self._samples.batches(self._batch_size))
        for batch in self._iter:
            short = self._samples.feeding.batch_size(batch) != self._batch_size
            if short and self._fixed_batch and self.batches_read:
                continue  # a short batch would break models with a fixed batch
            self.batches_read += 1
            return dict(batch)
        return None

    def rewind(self) -> None:
        self._iter = None
        self.batches_read = 0
