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
"""

from __future__ import annotations

import enum
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec

__all__ = [
    "SampleSet",
    "StreamedSamples",
    "ImageFolder",
    "ImagePreprocessing",
    "ImageLayout",
    "load_samples",
    "open_calibration",
    "samples_from_iterable",
    "CalibrationReader",
    "model_batch_size",
    "LABEL_KEY",
    "IMAGE_SUFFIXES",
]

LABEL_KEY = "label"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

Sample = dict[str, np.ndarray]  # one sample: input name -> array without the sample axis


def _signature(sample: Mapping[str, np.ndarray]) -> tuple:
    return tuple((k, v.shape) for k, v in sample.items())


def _stack(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.stack([s[k] for s in samples])) for k in samples[0]}


def group_batches(
    samples: Iterable[Mapping[str, np.ndarray]], batch_size: int, *, max_pending: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Samples of equal shapes stacked in batches of at most ``batch_size``; never padded.

    Samples wait in one bucket per shape until the bucket is full; when ``max_pending`` samples
    (default 8 batches) wait in all, the fullest bucket goes out early. Memory is thus bounded,
    and variable-length sequences still make mostly full batches. Order is not kept (calibration
    does not need it); it is deterministic.
    """
    limit = max_pending if max_pending is not None else 8 * batch_size
    buckets: dict[tuple, list[Mapping[str, np.ndarray]]] = {}
    pending = 0
    for sample in samples:
        bucket = buckets.setdefault(_signature(sample), [])
        bucket.append(sample)
        pending += 1
        if len(bucket) == batch_size:
            yield _stack(buckets.pop(_signature(sample)))
            pending -= batch_size
        elif pending > limit:
            key = max(buckets, key=lambda k: len(buckets[k]))
            pending -= len(buckets[key])
            yield _stack(buckets.pop(key))
    for bucket in buckets.values():
        yield _stack(bucket)


@dataclass(frozen=True)
class SampleSet:
    """Samples in memory, keyed by model input name, plus optional labels.

    Each input is either one array with samples on the first axis, or (a *ragged* set, for
    variable-length inputs) an object array holding one array per sample, without the sample axis.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    @property
    def is_ragged(self) -> bool:
        return any(v.dtype == object for v in self.inputs.values())

    def take(self, index: slice | np.ndarray) -> SampleSet:
        labels = None if self.labels is None else self.labels[index]
        return SampleSet({k: v[index] for k, v in self.inputs.items()}, labels, self.source)

    def split(self, holdout_fraction: float) -> tuple[SampleSet, SampleSet]:
        """(first part, last ``holdout_fraction`` part); deterministic, keeps order."""
        n = len(self)
        held = max(1, int(round(n * holdout_fraction)))
        return self.take(slice(0, n - held)), self.take(slice(n - held, n))

    def materialize(self) -> SampleSet:
        return self

    def sample(self, i: int) -> Sample:
        return {k: np.asarray(v[i]) for k, v in self.inputs.items()}

    def samples(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.sample(i)

    def indexed_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(sample indices, batch): in order for a regular set; a ragged set is grouped by shape
        (stable, so deterministic), each group cut into batches of at most ``batch_size``."""
        n = len(self)
        if not self.is_ragged:
            for start in range(0, n, batch_size):
                idx = np.arange(start, min(n, start + batch_size))
                yield idx, {k: np.ascontiguousarray(v[start : start + batch_size]) for k, v in self.inputs.items()}
            return
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            groups.setdefault(_signature(self.sample(i)), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                idx = np.asarray(members[start : start + batch_size])
                yield idx, _stack([self.sample(int(i)) for i in idx])

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for _, batch in self.indexed_batches(batch_size):
            yield batch


def _npz_counts(path: Path) -> dict[str, int]:
    """First-axis length of each array of an .npz, read from the headers without loading data."""
    counts = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, _ = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, _ = np.lib.format.read_array_header_2_0(f)
            counts[member[: -len(".npy")]] = shape[0] if shape else 1
    return counts


class StreamedSamples:
    """Samples read from a list of files, one file in memory at a time.

    ``reader(file)`` returns arrays keyed by input name with samples on the first axis (and an
    optional ``label``), already checked; ``counter(file)`` says how many samples a file holds
    without decoding it. ``take``/``split`` give lazy views; ``materialize`` loads a view.
    """

    def __init__(
        self,
        source: str,
        files: Sequence[Path],
        reader: Callable[[Path], dict[str, np.ndarray]],
        counter: Callable[[Path], int],
        *,
        start: int = 0,
        stop: int | None = None,
        _counts: list[int] | None = None,
    ) -> None:
        self.source = source
        self._files = list(files)
        self._reader = reader
        self._counter = counter
        self._counts = _counts
        self._start = start
        self._stop = stop

    labels = None  # labels of a stream are only read when it is materialized

    @property
    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = [self._counter(f) for f in self._files]
        return self._counts

    def __len__(self) -> int:
        total = sum(self.counts)
        stop = total if self._stop is None else min(self._stop, total)
        return max(0, stop - self._start)

    def take(self, index: slice) -> StreamedSamples:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a streamed sample set takes contiguous slices only")
        start, stop, _ = index.indices(len(self))
        return StreamedSamples(
            self.source, self._files, self._reader, self._counter,
            start=self._start + start, stop=self._start + max(start, stop), _counts=self.counts,
        )

    def split(self, holdout_fraction: float) -> tuple[StreamedSamples, StreamedSamples]:
        n = len(self)
        held = max(1, int(round(n * holdout_fraction)))
        return self.take(slice(0, n - held)), self.take(slice(n - held, n))

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """Each file's arrays, cut to this view's sample range; files outside it are not read."""
        position = 0
        stop = self._start + len(self)
        for path, count in zip(self._files, self.counts):
            lo, hi = max(self._start, position), min(stop, position + count)
            if lo < hi:
                arrays = self._reader(path)
                yield {k: v[lo - position : hi - position] for k, v in arrays.items()}
            position += count
            if position >= stop:
                return

    def samples(self) -> Iterator[Sample]:
        for chunk in self._chunks():
            inputs = {k: v for k, v in chunk.items() if k != LABEL_KEY}
            for i in range(len(next(iter(inputs.values())))):
                yield {k: v[i] for k, v in inputs.items()}

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        return group_batches(self.samples(), batch_size)

    def materialize(self) -> SampleSet:
        """Load this view into memory (ragged when the files' shapes differ)."""
        chunks = list(self._chunks())
        if not chunks:
            raise CalibrationDataError(f"{self.source}: no samples")
        names = [k for k in chunks[0] if k != LABEL_KEY]
        labels = None
        if all(LABEL_KEY in c for c in chunks):
            labels = np.concatenate([_labels(c[LABEL_KEY]) for c in chunks])
        inputs = {}
        for name in names:
            parts = [c[name] for c in chunks]
            if len({p.shape[1:] for p in parts}) == 1:
                inputs[name] = np.concatenate(parts)
            else:
                inputs[name] = _object_array([row for p in parts for row in p])
        return SampleSet(inputs, labels, self.source)


def _object_array(items: Sequence[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    return labels.reshape(len(labels), -1)[:, 0] if labels.ndim > 1 else labels


def _read_file(path: Path, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise CalibrationDataError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            if len(input_names) != 1:
                raise CalibrationDataError(
                    f"{path}: a .npy file can feed only a single-input model; this one has "
                    f"{', '.join(input_names)}",
                    hint="use an .npz with one array per input name",
                )
            return {input_names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except CalibrationDataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) and not _looks_like_numpy(path):
            raise CalibrationDataError(
                f"{path}: not an .npz/.npy file (no zip or NumPy header)",
                hint="write it with numpy: np.savez(path, input_name=array)",
            ) from e
        if "allow_pickle" in str(e):
            raise CalibrationDataError(
                f"{path}: holds Python objects (object dtype), which onnxforge does not unpickle",
                hint="save numeric arrays, e.g. np.savez(path, x=np.asarray(x, dtype=np.float32))",
            ) from e
        raise CalibrationDataError(f"{path}: not a readable .npz/.npy file ({type(e).__name__})") from e
    except Exception as e:
        raise CalibrationDataError(f"{path}: not a readable .npz/.npy file ({type(e).__name__})") from e


def _array_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))


def _looks_like_numpy(path: Path) -> bool:
    """A zip archive (.npz) or a file with NumPy's .npy magic; anything else is junk, not pickles."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return False
    return head == b"\x93NUMPY" or zipfile.is_zipfile(path)


def _check_array(path: Path | str, spec: TensorSpec, array: np.ndarray, *, ragged_ok: bool = False) -> np.ndarray:
    """``array`` (samples on the first axis) checked and cast to ``spec``'s dtype.

    With ``ragged_ok`` only the dims the model fixes are checked; dynamic dims may differ
    between files (they are grouped into equal-shape batches later).
    """
    where = f"{path}: input {spec.name!r}"
    if array.dtype.kind not in "biuf":
        raise CalibrationDataError(f"{where} has dtype {array.dtype}; expected {spec.dtype}")
    if spec.dtype.kind == "f" and array.dtype.kind == "f":
        with np.errstate(over="ignore"):  # values out of range become Inf, reported below (no warning on stderr)
            array = array.astype(spec.dtype, copy=False)
    elif spec.dtype.kind in "iu" and array.dtype.kind in "iu":
        array = array.astype(spec.dtype, copy=False)
    elif spec.dtype != array.dtype:
        raise CalibrationDataError(f"{where} has dtype {array.dtype}; the model expects {spec.dtype}")
    if array.ndim != len(spec.shape):
        raise CalibrationDataError(
            f"{where} has rank {array.ndim} (shape {'x'.join(map(str, array.shape))}); the model expects "
            f"rank {len(spec.shape)} ({spec.shape_text()}), with samples on the first axis"
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
        if axis > 0 and isinstance(want, int) and got != want:
            raise CalibrationDataError(
                f"{where} has shape {'x'.join(map(str, array.shape))}; the model expects {spec.shape_text()}"
                f" (dimension {axis} must be {want})"
            )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise CalibrationDataError(f"{where} holds {bad} NaN/Inf values (after casting to {spec.dtype})")
    return array


def _checked_arrays(path: Path, arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        have = ", ".join(k for k in arrays) or "nothing"
        raise CalibrationDataError(
            f"{path}: no array for model input {missing[0]!r} (the file has: {have})",
            hint="the .npz must hold one array per model input, keyed by the input's name",
        )
    inputs = {s.name: _check_array(path, s, np.asarray(arrays[s.name])) for s in specs}
    counts = {n: len(a) for n, a in inputs.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{path}: inputs have different sample counts: {counts}")
    if LABEL_KEY in arrays:
        labels = np.asarray(arrays[LABEL_KEY])
        n = next(iter(counts.values()), 0)
        if labels.dtype.kind == "f" and labels.ndim and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)  # whole-number float labels are class ids too
        if labels.ndim == 0 or labels.dtype.kind not in "biu":  # found by fuzzing: a scalar or text label crashed
            raise CalibrationDataError(
                f"{path}: {LABEL_KEY!r} must be an array of integer class ids, one per sample; got "
                f"{labels.dtype} of shape {'x'.join(map(str, labels.shape)) or 'scalar'}"
            )
        if len(labels) != n:
            raise CalibrationDataError(f"{path}: {len(labels)} labels for {n} samples")
        inputs[LABEL_KEY] = labels
    return inputs


def stream_folder(path: Path, specs: Sequence[TensorSpec]) -> StreamedSamples:
    """A folder of .npz/.npy files as a StreamedSamples (checked file by file, as it is read)."""
    files = _array_files(path)
    if not files:
        raise CalibrationDataError(f"{path}: folder holds no .npz or .npy files")
    names = [s.name for s in specs]

    def read(f: Path) -> dict[str, np.ndarray]:
        return _checked_arrays(f, _read_file(f, names), specs)

    def count(f: Path) -> int:
        try:
            if f.suffix == ".npy":
                return int(np.load(f, mmap_mode="r", allow_pickle=False).shape[0])
            counts = _npz_counts(f)
        except Exception as e:
            raise CalibrationDataError(f"{f}: not a readable .npz/.npy file ({type(e).__name__})") from e
        if names[0] not in counts:
            return len(read(f)[names[0]])  # let the full check name what is wrong
        return counts[names[0]]

    return StreamedSamples(str(path), files, read, count)


def load_samples(
    path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    *,
    min_samples: int = 1,
    want_labels: bool = False,
    allow_ragged: bool = False,
) -> SampleSet:
    """Load and check samples for a model with inputs ``specs``, all in memory.

    A folder's files are concatenated; files whose dynamic dims differ are an error unless
    ``allow_ragged``, which returns a ragged set instead.
    """
    path = Path(path)
    if path.is_dir():
        stream = stream_folder(path, specs)
        samples = stream.materialize()
        if samples.is_ragged and not allow_ragged:
            raise CalibrationDataError(f"{path}: files have arrays of different shapes")
    else:
        arrays = _checked_arrays(path, _read_file(path, [s.name for s in specs]), specs)
        labels = arrays.pop(LABEL_KEY, None)
        samples = SampleSet(arrays, None if labels is None else _labels(labels), str(path))
    n = len(samples)
    if n < min_samples:
        raise CalibrationDataError(f"{path}: {n} samples; at least {min_samples} are needed")
    if want_labels and samples.labels is None:
        raise CalibrationDataError(f"{path}: no {LABEL_KEY!r} array; accuracy needs labels")
    return samples


# ----------------------------------------------------------------------------------------------
# Images


class ImageLayout(enum.Enum):
    AUTO = "auto"  # from the model input: channels (1 or 3) on axis 1 = NCHW, on the last axis = NHWC
    NCHW = "nchw"
    NHWC = "nhwc"


@dataclass(frozen=True, kw_only=True)
class ImagePreprocessing:
    """How an image file becomes a model input: resize to ``size`` (height, width; None = the
    model input's fixed H and W), convert to RGB (3 channels) or grayscale (1), multiply by
    ``scale``, subtract ``mean`` and divide by ``std`` per channel, lay out as ``layout``."""

    size: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: ImageLayout = ImageLayout.AUTO



@dataclass(frozen=True)
class ImageFolder:
    """A folder of image files (searched recursively, sorted by path) and their preprocessing."""

    path: Path
    preprocessing: ImagePreprocessing = ImagePreprocessing()


def _image_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _resolve_image_geometry(spec: TensorSpec, pre: ImagePreprocessing, where: str) -> tuple[ImageLayout, int, int, int]:
    if len(spec.shape) != 4:
        raise CalibrationDataError(f"{where}: images need a rank-4 model input; {spec.name!r} is {spec.shape_text()}")
    layout = pre.layout
    _, a1, _, a3 = spec.shape
    if layout is ImageLayout.AUTO:
        if a1 in (1, 3):
            layout = ImageLayout.NCHW
        elif a3 in (1, 3):
            layout = ImageLayout.NHWC
        else:
            raise CalibrationDataError(
                f"{where}: cannot tell the layout of input {spec.name!r} ({spec.shape_text()})",
                hint="declare it: layout nchw or nhwc (--layout)",
            )
    if layout is ImageLayout.NCHW:
        c, h, w = spec.shape[1], spec.shape[2], spec.shape[3]
    else:
        c, h, w = spec.shape[3], spec.shape[1], spec.shape[2]
    if c not in (1, 3):
        raise CalibrationDataError(f"{where}: input {spec.name!r} has {c} channels; images give 1 or 3")
    if pre.size is not None:
        h, w = pre.size
    if not (isinstance(h, int) and isinstance(w, int)):
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} has dynamic height/width ({spec.shape_text()})",
            hint="declare the size to resize images to (--image-size HxW)",
        )
    for name, values in (("mean", pre.mean), ("std", pre.std)):
        if len(values) not in (1, c):
            raise CalibrationDataError(f"{where}: {name} has {len(values)} values; the input has {c} channels")
    if any(s == 0 for s in pre.std):
        raise CalibrationDataError(f"{where}: std must not be 0")
    return layout, c, h, w


def stream_images(folder: ImageFolder, specs: Sequence[TensorSpec]) -> StreamedSamples:
    """An image folder as a StreamedSamples of one sample per file, decoded one file at a time."""
    path = Path(folder.path)
    if len(specs) != 1:
        raise CalibrationDataError(
            f"{path}: images can feed only a single-input model; this one has {', '.join(s.name for s in specs)}"
        )
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationDataError(
            f"{path}: reading images needs Pillow, which is not installed",
            hint="pip install pillow (or onnxforge[images])",
        ) from None
    files = _image_files(path)
    if not files:
        raise CalibrationDataError(f"{path}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    spec = specs[0]
    pre = folder.preprocessing
    layout, channels, height, width = _resolve_image_geometry(spec, pre, str(path))
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    if spec.dtype.kind != "f":
        raise CalibrationDataError(f"{path}: input {spec.name!r} takes {spec.dtype}; images are fed as float")

    def read(f: Path) -> dict[str, np.ndarray]:
        try:
            with Image.open(f) as image:
                image = image.convert("RGB" if channels == 3 else "L")
                image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except Exception as e:
            raise CalibrationDataError(f"{f}: not a readable image ({type(e).__name__})") from e
        pixels = pixels.reshape(height, width, channels) * np.float32(pre.scale)
        pixels = (pixels - mean) / std
        if layout is ImageLayout.NCHW:
            pixels = pixels.transpose(2, 0, 1)
        return {spec.name: np.ascontiguousarray(pixels[None].astype(spec.dtype))}

    return StreamedSamples(str(path), files, read, lambda f: 1)


# ----------------------------------------------------------------------------------------------
# Python iterables (lists, generators, torch Dataset / DataLoader), duck-typed


def _to_numpy(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    elif hasattr(value, "numpy") and callable(value.numpy):
        value = value.numpy()
    try:
        array = np.asarray(value)
    except Exception as e:
        raise CalibrationDataError(f"{where}: cannot read {type(value).__name__} as an array") from e
    if array.dtype == object:
        raise CalibrationDataError(f"{where}: holds {type(value).__name__} that is not a numeric array")
    return array


def _split_item(item: Any, specs: Sequence[TensorSpec], where: str) -> tuple[dict[str, Any], Any]:
    names = [s.name for s in specs]
    if isinstance(item, Mapping):
        missing = [n for n in names if n not in item]
        if missing:
            raise CalibrationDataError(
                f"{where}: no value for model input {missing[0]!r} (it has: {', '.join(map(str, item))})"
            )
        return {n: item[n] for n in names}, item.get(LABEL_KEY)
    if isinstance(item, (tuple, list)):
        if len(item) == len(names):
            return dict(zip(names, item)), None
        if len(item) == len(names) + 1:
            return dict(zip(names, item[: len(names)])), item[-1]
        raise CalibrationDataError(
            f"{where}: a tuple of {len(item)} values; the model has {len(names)} input(s) "
            f"({', '.join(names)}), optionally followed by a label"
        )
    if len(names) == 1:
        return {names[0]: item}, None
    raise CalibrationDataError(f"{where}: give a mapping of input name to array for a model with {len(names)} inputs")


def samples_from_iterable(
    iterable: Iterable[Any], specs: Sequence[TensorSpec], *, limit: int, source: str | None = None
) -> SampleSet:
    """Read at most ``limit`` samples from ``iterable`` (see the module doc for the item forms).

    An item's array of the model input's rank is a batch (samples on the first axis); one of
    rank - 1 is a single sample. Stops reading once ``limit`` samples are in, so an endless
    generator or a large DataLoader costs only what is used.
    """
    source = source or f"<{type(iterable).__name__}>"
    rows: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    labels: list[Any] = []
    has_labels = True
    taken = 0
    for index, item in enumerate(iterable):
        where = f"{source} item {index}"
        values, label = _split_item(item, specs, where)
        batch = None
        for spec in specs:
            array = _to_numpy(values[spec.name], f"{where} input {spec.name!r}")
            if array.ndim == len(spec.shape) - 1:
                array = array[None]
            array = _check_array(where, spec, array)
            if batch is not None and len(array) != batch:
                raise CalibrationDataError(f"{where}: inputs have different batch sizes")
            batch = len(array)
            rows[spec.name].extend(array)
        if label is None:
            has_labels = False
        else:
            label_array = _to_numpy(label, f"{where} label").reshape(-1)
            labels.extend(label_array if len(label_array) == batch else np.resize(label_array, batch))
        taken += batch or 0
        if taken >= limit:
            break
    if taken == 0:
        raise CalibrationDataError(f"{source}: the iterable yielded no samples")
    inputs = {}
    for name, items in rows.items():
        items = items[:limit]
        inputs[name] = np.stack(items) if len({a.shape for a in items}) == 1 else _object_array(items)
    label_array = np.asarray(labels[:limit]) if has_labels and labels else None
    return SampleSet(inputs, label_array, source)


def open_calibration(
    calibration: Any, specs: Sequence[TensorSpec], *, limit: int
) -> SampleSet | StreamedSamples:
    """Any supported source as a SampleSet (in memory) or StreamedSamples (read as iterated).

    ``limit`` bounds what is read from a Python iterable (which may be endless); file sources
    are counted, then read lazily, so callers slice them to what they need.
    """
    if isinstance(calibration, (SampleSet, StreamedSamples)):
        return calibration
    if isinstance(calibration, ImageFolder):
        return stream_images(calibration, specs)
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if path.is_dir():
            if _array_files(path):
                return stream_folder(path, specs)
            if _image_files(path):
                return stream_images(ImageFolder(path), specs)
            raise CalibrationDataError(f"{path}: folder holds no .npz, .npy or image files")
        return load_samples(path, specs, allow_ragged=True)
    if isinstance(calibration, (bytes, bytearray)) or not isinstance(calibration, Iterable):
        raise CalibrationDataError(
            f"calibration data of type {type(calibration).__name__} is not supported",
            hint="give an .npz path, a folder, an ImageFolder, or an iterable of samples",
        )
    return samples_from_iterable(calibration, specs, limit=limit)


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
            short = len(next(iter(batch.values()))) != self._batch_size
            if short and self._fixed_batch and self.batches_read:
                continue  # a short batch would break models with a fixed batch
            self.batches_read += 1
            return dict(batch)
        return None

    def rewind(self) -> None:
        self._iter = None
        self.batches_read = 0
