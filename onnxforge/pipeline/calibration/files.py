"""Samples from ``.npz``/``.npy`` files and folders of them, checked against the model's inputs.

An ``.npz`` holds one array per model input, keyed by input name, first axis = samples (other
arrays, such as ``label``, are ignored as inputs); a ``.npy`` feeds the model's only input. A folder
of such files is read in sorted file order *one file at a time* (``stream_folder``); its files may
differ in their dynamic dims. Every problem is a CalibrationDataError naming the file and the input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec
from onnxforge.pipeline.calibration.feeding import CONST_SUFFIX, Feeding, batch_axis_for, check_constant, parse_key
from onnxforge.pipeline.calibration.npy_rows import StoredArray, stored_arrays
from onnxforge.pipeline.calibration.samples import LABEL_KEY, SampleSet, StreamedSamples

__all__ = [
    "array_files", "check_array", "load_samples", "materialize_checked", "open_samples", "stream_file", "stream_folder",
]


def _stored(path: Path, input_names: Sequence[str]) -> dict[str, StoredArray]:
    """The arrays of ``path`` by key, from their headers (nothing is loaded); a .npy feeds the only input."""
    if not path.exists():
        raise CalibrationDataError(f"{path}: no such file")
    stored = stored_arrays(path)
    if "" in stored:  # an .npy file
        if len(input_names) != 1:
            raise CalibrationDataError(
                f"{path}: a .npy file can feed only a single-input model; this one has {', '.join(input_names)}",
                hint="use an .npz with one array per input name",
            )
        return {input_names[0]: stored[""]}
    return stored


def _is_per_sample(key: str, array: StoredArray) -> bool:
    """Samples on the first axis (read by rows), as opposed to a constant (read whole)."""
    return array.ndim > 0 and parse_key(key)[1] != "const"


def _sample_count(path: Path, stored: Mapping[str, StoredArray], input_names: Sequence[str]) -> int | None:
    """How many samples the file holds, from its headers: the common first-axis length of its per-sample
    inputs (and labels); None when it has none. Lengths that differ are an error here, before any
    partial read could hide them."""
    counts = {key: len(a) for key, a in stored.items()
              if parse_key(key)[0] in input_names and _is_per_sample(key, a)}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{path}: inputs have different sample counts: {counts}")
    n = next(iter(counts.values()), None)
    label = stored.get(LABEL_KEY)
    if n is not None and label is not None and label.ndim and len(label) != n:
        raise CalibrationDataError(f"{path}: {len(label)} labels for {n} samples")
    return n


def _read_rows(
    path: Path, input_names: Sequence[str], start: int = 0, stop: int | None = None
) -> dict[str, np.ndarray]:
    """The arrays of ``path``: per-sample ones (and labels) cut to samples ``[start, stop)`` and read
    only there; constants whole."""
    stored = _stored(path, input_names)
    _sample_count(path, stored, input_names)
    out = {}
    for key, array in stored.items():
        if _is_per_sample(key, array):
            out[key] = array.rows(start, len(array) if stop is None else stop)
        else:
            out[key] = array.rows(0, len(array))
    return out


def array_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))


def check_array(
    path: Path | str, spec: TensorSpec, array: np.ndarray, *, ragged_ok: bool = False, batch_axis: int = 0
) -> np.ndarray:
    """``array`` (samples on the first axis) checked and cast to ``spec``'s dtype.

    A sample is the model's input without its batch axis (``batch_axis``, see onnxforge.pipeline.
    calibration.feeding). With ``ragged_ok`` only the dims the model fixes are checked; dynamic dims
    may differ between files (they are grouped into equal-shape batches later).
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
        hint = None
        if not spec.shape:
            hint = (
                f"a scalar input takes one value for every batch: save it as a 0-d array, or under the key "
                f"'{spec.name}{CONST_SUFFIX}'"
            )
        raise CalibrationDataError(
            f"{where} has rank {array.ndim} (shape {'x'.join(map(str, array.shape))}); the model expects "
            f"rank {len(spec.shape)} ({spec.shape_text()}), with samples on the first axis",
            hint=hint,
        )
    declared = list(spec.shape[:batch_axis]) + list(spec.shape[batch_axis + 1 :])
    for axis, (got, want) in enumerate(zip(array.shape[1:], declared, strict=True), start=1):
        if isinstance(want, int) and got != want:
            where_axis = f"dimension {axis}" if batch_axis == 0 else f"dimension {axis} of a sample"
            raise CalibrationDataError(
                f"{where} has shape {'x'.join(map(str, array.shape))}; the model expects {spec.shape_text()}"
                f" ({where_axis} must be {want})"
            )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise CalibrationDataError(f"{where} holds {bad} NaN/Inf values (after casting to {spec.dtype})")
    return array


def _split_keys(path: Path, arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> tuple[dict, Feeding]:
    """Per-sample arrays by input name, and how they are fed (see the feeding module's convention)."""
    per_sample: dict[str, np.ndarray] = {}
    constants: dict[str, np.ndarray] = {}
    axes: dict[str, int] = {}
    by_name = {s.name: s for s in specs}
    for key, value in arrays.items():
        name, mode = parse_key(key)
        spec = by_name.get(name)
        if spec is None:
            if key != LABEL_KEY and mode is not None:
                raise CalibrationDataError(f"{path}: {key!r} names no model input (inputs: {', '.join(by_name)})")
            continue
        value = np.asarray(value)
        where = f"{path}: input {name!r}"
        if mode == "const" or (not spec.shape and value.ndim == 0):
            constants[name] = check_constant(where, spec, value)
        elif not spec.shape and value.ndim == 1 and value.size and np.all(value == value.flat[0]):
            constants[name] = check_constant(where, spec, value[0])  # the same scalar for every sample
        elif isinstance(mode, int):
            if not 0 <= mode < max(len(spec.shape), 1):
                raise CalibrationDataError(f"{path}: {key!r}: the model input has rank {len(spec.shape)}")
            per_sample[name], axes[name] = value, mode
        else:
            per_sample[name] = value
            axes[name] = batch_axis_for(spec, value.shape[1:]) if value.ndim else 0
        if name in constants and name in per_sample:
            raise CalibrationDataError(f"{path}: input {name!r} is given both per sample and as a constant")
    return per_sample, Feeding(constants, {k: a for k, a in axes.items() if a})


def _checked_arrays(
    path: Path, arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]
) -> tuple[dict[str, np.ndarray], Feeding]:
    per_sample, feeding = _split_keys(path, arrays, specs)
    missing = [s.name for s in specs if s.name not in per_sample and s.name not in feeding.constants]
    if missing:
        have = ", ".join(k for k in arrays) or "nothing"
        raise CalibrationDataError(
            f"{path}: no array for model input {missing[0]!r} (the file has: {have})",
            hint="the .npz must hold one array per model input, keyed by the input's name "
            f"('NAME{CONST_SUFFIX}' for a value fed unchanged with every batch)",
        )
    inputs = {
        s.name: check_array(path, s, per_sample[s.name], batch_axis=feeding.batch_axes.get(s.name, 0))
        for s in specs
        if s.name in per_sample
    }
    if not specs:
        raise CalibrationDataError(f"{path}: the model has no inputs: there is nothing to feed it samples of",
                                   hint="a model without inputs computes constants; nothing here needs data")
    if not inputs:
        raise CalibrationDataError(
            f"{path}: every input is a constant: there are no samples",
            hint="give at least one input per sample, samples on the first axis",
        )
    counts = {n: len(a) for n, a in inputs.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{path}: inputs have different sample counts: {counts}")
    if LABEL_KEY in arrays:
        labels = np.asarray(arrays[LABEL_KEY])
        n = next(iter(counts.values()), 0)
        if (
            labels.dtype.kind == "f"
            and labels.ndim
            and np.all(np.isfinite(labels))
            and np.all(labels == np.round(labels))
        ):
            labels = labels.astype(np.int64)  # whole-number float labels are class ids too
        if labels.dtype.kind == "S":  # bytes: text as NumPy's 'S' dtype stores it
            labels = np.char.decode(labels, "utf-8", errors="replace")
        # integer class ids, or text a user metric reads (a captcha's characters); a scalar crashed (fuzzing)
        if labels.ndim == 0 or labels.dtype.kind not in "biuU" or (labels.dtype.kind == "U" and labels.ndim != 1):
            raise CalibrationDataError(
                f"{path}: {LABEL_KEY!r} must be an array of integer class ids, or of text (for a file.py:function "
                f"metric), one per sample; got {labels.dtype} of shape {'x'.join(map(str, labels.shape)) or 'scalar'}"
            )
        if len(labels) != n:
            raise CalibrationDataError(f"{path}: {len(labels)} labels for {n} samples")
        inputs[LABEL_KEY] = labels
    return inputs, feeding


def stream_folder(path: Path, specs: Sequence[TensorSpec]) -> StreamedSamples:
    """A folder of .npz/.npy files as a StreamedSamples (checked file by file, as it is read)."""
    files = array_files(path)
    if not files:
        raise CalibrationDataError(f"{path}: folder holds no .npz or .npy files")
    return _stream(str(path), files, specs)


def stream_file(path: Path, specs: Sequence[TensorSpec]) -> StreamedSamples:
    """One .npz/.npy file as a StreamedSamples: only the samples a view asks for are read and checked."""
    stream = _stream(str(path), [Path(path)], specs)
    if not len(stream):
        raise CalibrationDataError(f"{path}: 0 samples; at least 1 is needed")
    return stream


def open_samples(path: str | os.PathLike, specs: Sequence[TensorSpec]) -> StreamedSamples:
    """An .npz/.npy file or a folder of them, opened lazily (headers read, no samples); its files must
    agree in every per-sample shape (no ragged set): for stages that fit on equal-shape arrays."""
    path = Path(path)
    if not path.is_dir():
        return stream_file(path, specs)
    stream = stream_folder(path, specs)
    names = [s.name for s in specs]
    shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in array_files(path):
        for key, array in _stored(f, names).items():
            name = parse_key(key)[0]
            if name in names and _is_per_sample(key, array):
                first = shapes.setdefault(name, (f, array.shape[1:]))
                if first[1] != array.shape[1:]:
                    raise CalibrationDataError(
                        f"{path}: files have arrays of different shapes ({name!r}: {first[0].name} "
                        f"{'x'.join(map(str, first[1]))}, {f.name} {'x'.join(map(str, array.shape[1:]))})"
                    )
    return stream


_PROBE = 8  # samples of the first file read up front: how its inputs are fed (constants, batch axes)


def _stream(source: str, files: Sequence[Path], specs: Sequence[TensorSpec]) -> StreamedSamples:
    names = [s.name for s in specs]
    _, feeding = _checked_arrays(files[0], _read_rows(files[0], names, 0, _PROBE), specs)

    def read(f: Path, start: int, stop: int) -> dict[str, np.ndarray]:
        arrays, own = _checked_arrays(f, _read_rows(f, names, start, stop), specs)
        if not _same_feeding(own, feeding):
            raise CalibrationDataError(
                f"{f}: its constants or batch axes differ from {files[0].name}'s",
                hint="every file of a folder feeds the model the same way; keep constants identical",
            )
        return arrays

    def count(f: Path) -> int:
        n = _sample_count(f, _stored(f, names), names)
        if n is None:  # no per-sample input: the full check names what is wrong
            read(f, 0, 1)
            raise CalibrationDataError(f"{f}: holds no per-sample input")
        return n

    return StreamedSamples(source, files, read, count, feeding=feeding)


def _same_feeding(a: Feeding, b: Feeding) -> bool:
    return (
        dict(a.batch_axes) == dict(b.batch_axes)
        and a.constants.keys() == b.constants.keys()
        and all(np.array_equal(a.constants[k], b.constants[k]) for k in a.constants)
    )


def load_samples(
    path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    *,
    min_samples: int = 1,
    want_labels: bool = False,
    allow_ragged: bool = False,
    limit: int | None = None,
) -> SampleSet:
    """Load and check samples of an .npz/.npy file or a folder of them for a model with inputs
    ``specs``, all in memory: the first ``limit`` (all when None); nothing past them is read.
    (Stages read their data through ``onnxforge.pipeline.data_spec.load_data``, which takes image
    folders too.)

    A folder's files are concatenated; files whose dynamic dims differ are an error unless
    ``allow_ragged``, which returns a ragged set instead.
    """
    path = Path(path)
    stream = stream_folder(path, specs) if path.is_dir() else stream_file(path, specs)
    return materialize_checked(
        stream, min_samples=min_samples, want_labels=want_labels, allow_ragged=allow_ragged, limit=limit
    )


def materialize_checked(
    stream: StreamedSamples,
    *,
    min_samples: int = 1,
    want_labels: bool = False,
    allow_ragged: bool = False,
    limit: int | None = None,
) -> SampleSet:
    """The first ``limit`` samples of ``stream`` in memory, checked as ``load_samples`` says."""
    if limit is not None:
        stream = stream.take(slice(0, limit))
    if len(stream) < min_samples:
        raise CalibrationDataError(f"{stream.source}: {len(stream)} samples; at least {min_samples} are needed")
    samples = stream.materialize()
    if samples.is_ragged and not allow_ragged:
        raise CalibrationDataError(f"{stream.source}: files have arrays of different shapes")
    if want_labels and samples.labels is None:
        raise CalibrationDataError(f"{stream.source}: no {LABEL_KEY!r} array; accuracy needs labels")
    return samples
