"""Samples from ``.npz``/``.npy`` files and folders of them, checked against the model's inputs.

An ``.npz`` holds one array per model input, keyed by input name, first axis = samples (other
arrays, such as ``label``, are ignored as inputs); a ``.npy`` feeds the model's only input. A folder
of such files is read in sorted file order *one file at a time* (``stream_folder``); its files may
differ in their dynamic dims. Every problem is a CalibrationDataError naming the file and the input.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec
from onnxforge.pipeline.calibration.samples import LABEL_KEY, SampleSet, StreamedSamples, as_labels

__all__ = ["array_files", "check_array", "load_samples", "stream_folder"]


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


def array_files(path: Path) -> list[Path]:
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


def check_array(path: Path | str, spec: TensorSpec, array: np.ndarray, *, ragged_ok: bool = False) -> np.ndarray:
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
    inputs = {s.name: check_array(path, s, np.asarray(arrays[s.name])) for s in specs}
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
    files = array_files(path)
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
        samples = SampleSet(arrays, None if labels is None else as_labels(labels), str(path))
    n = len(samples)
    if n < min_samples:
        raise CalibrationDataError(f"{path}: {n} samples; at least {min_samples} are needed")
    if want_labels and samples.labels is None:
        raise CalibrationDataError(f"{path}: no {LABEL_KEY!r} array; accuracy needs labels")
    return samples
