"""Calibration and evaluation data: loading, checking against the model, and feeding onnxruntime.

Sources (``open_calibration`` takes any of them):

- an ``.npz`` with one array per model input, keyed by input name, first axis = samples (other
  arrays, such as ``label``, are ignored as inputs);
- a folder of such ``.npz``/``.npy`` files (a ``.npy`` feeds the model's only input), read in
  sorted file order *one file at a time* (``StreamedSamples``): memory holds one file and one
  batch, whatever the folder's size. Files may differ in their dynamic dims (token sequences of
  different lengths, e.g. one ``.npz`` per sample);
- a folder of images with a declared ``ImagePreprocessing`` (resize, scale, mean/std, NCHW/NHWC),
  decoded one at a time with Pillow;
- through the Python API, any iterable (a list, a generator, a torch ``Dataset`` or
  ``DataLoader``): items are a mapping of input name to array, a tuple (inputs in order, then an
  optional label), or a single array for a single-input model; arrays may be torch tensors
  (duck-typed: nothing here imports torch) and may hold one sample or a batch.

Variable-length samples are kept as *ragged* sets (object arrays of per-sample arrays) and fed
in batches of equal shape: never padded, so padding values cannot distort calibration ranges.
Every problem is a CalibrationDataError that names the file, the input and the fix.

Modules by job: ``samples`` (SampleSet, StreamedSamples, batching by shape), ``files`` (.npz/.npy
files and folders, and the checks), ``images``, ``iterables``, ``sources`` (``open_calibration``)
and ``reader`` (``CalibrationReader``, ``model_batch_size``).
"""

from onnxforge.pipeline.calibration.files import load_samples, open_samples, stream_file, stream_folder
from onnxforge.pipeline.calibration.images import (
    IMAGE_SUFFIXES,
    ImageFolder,
    ImageLayout,
    ImagePreprocessing,
    stream_images,
)
from onnxforge.pipeline.calibration.iterables import samples_from_iterable
from onnxforge.pipeline.calibration.reader import CalibrationReader, model_batch_size
from onnxforge.pipeline.calibration.samples import LABEL_KEY, SampleSet, StreamedSamples, group_batches
from onnxforge.pipeline.calibration.sources import open_calibration

__all__ = [
    "IMAGE_SUFFIXES",
    "LABEL_KEY",
    "CalibrationReader",
    "ImageFolder",
    "ImageLayout",
    "ImagePreprocessing",
    "SampleSet",
    "StreamedSamples",
    "group_batches",
    "load_samples",
    "model_batch_size",
    "open_calibration",
    "open_samples",
    "samples_from_iterable",
    "stream_file",
    "stream_folder",
    "stream_images",
]
