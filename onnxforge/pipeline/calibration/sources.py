"""Any supported calibration source opened as samples: a SampleSet, a StreamedSamples, an ImageFolder,
a DataSpec, an ``.npz``/``.npy`` path, a folder of those or of images, or a Python iterable.
Paths and DataSpecs are opened by ``onnxforge.pipeline.data_spec.open_data``, as every stage opens them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec
from onnxforge.pipeline.calibration.images import ImageFolder, stream_images
from onnxforge.pipeline.calibration.iterables import samples_from_iterable
from onnxforge.pipeline.calibration.samples import SampleSet, StreamedSamples

__all__ = ["open_calibration"]


def open_calibration(
    calibration: Any, specs: Sequence[TensorSpec], *, limit: int
) -> SampleSet | StreamedSamples:
    """Any supported source as a SampleSet (in memory) or StreamedSamples (read as iterated).

    ``limit`` bounds what is read from a Python iterable (which may be endless); file sources
    (an .npz/.npy file included) are counted from their headers, then read lazily, so callers
    slice them to what they need and nothing else of the file is read.
    """
    if isinstance(calibration, (SampleSet, StreamedSamples)):
        return calibration
    if isinstance(calibration, ImageFolder):
        return stream_images(calibration, specs)
    from onnxforge.pipeline.data_spec import DataSpec, open_data  # data_spec reads through this package

    if isinstance(calibration, (str, os.PathLike, DataSpec)):
        return open_data(calibration, specs)
    if isinstance(calibration, (bytes, bytearray)) or not isinstance(calibration, Iterable):
        raise CalibrationDataError(
            f"calibration data of type {type(calibration).__name__} is not supported",
            hint="give an .npz path, a folder, a DataSpec, an ImageFolder, or an iterable of samples",
        )
    return samples_from_iterable(calibration, specs, limit=limit)
