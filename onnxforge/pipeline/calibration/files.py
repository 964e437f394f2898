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
from onnxforge.pipeline.calibration.feeding import CONST_SUFFIX, Feeding, batch_axis_for, check_constant, parse_key
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
            hint = (f"a scalar input takes one value for every batch: save it as a 0-d array, or under the key "
                    f"'{spec.name}{CONST_SUFFIX}'")
        raise CalibrationDataError(
            f"{where} has rank {array.ndim} (shape {'x'.join(map(str, array.shape))}); the model expects "
            f"rank {len(spec.shape)} ({spec.shape_text()}), with samples on the first axis",
            hint=hint,
        )
    declared = list(spec.shape[:batch_axis]) + list(spec.shape[batch_axis + 1 :])
    for axis, (got, want) in enumerate(zip(array.shape[1:], declared), start=1):
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
        for s in specs if s.name in per_sample
    }
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
    return inputs, feeding


def stream_folder(path: Path, specs: Sequence[TensorSpec]) -> StreamedSamples:
    """A folder of .npz/.npy files as a StreamedSamples (checked file by file, as it is read)."""
    files = array_files(path)
    if not files:
        raise CalibrationDataError(f"{path}: folder holds no .npz or .npy files")
    names = [s.name for s in specs]
    _, feeding = _checked_arrays(files[0], _read_file(files[0], names), specs)  # one file: what streaming holds

    def read(f: Path) -> dict[str, np.ndarray]:
        arrays, own = _checked_arrays(f, _read_file(f, names), specs)
        if not _same_feeding(own, feeding):
            raise CalibrationDataError(
                f"{f}: its constants or batch axes differ from {files[0].name}'s",
                hint="every file of a folder feeds the model the same way; keep constants identical",
            )
        return arrays

    per_sample = [n for n in names if n not in feeding.constants]

    def count(f: Path) -> int:
        try:
            if f.suffix == ".npy":
                return int(np.load(f, mmap_mode="r", allow_pickle=False).shape[0])
            counts = _npz_counts(f)
        except Exception as e:
            raise CalibrationDataError(f"{f}: not a readable .npz/.npy file ({type(e).__name__})") from e
        for key, n in counts.items():
            name, mode = parse_key(key)
            if per_sample and name == per_sample[0] and mode != "const":
                return n
        return len(read(f)[per_sample[0]])  # let the full check name what is wrong

    return StreamedSamples(str(path), files, read, count, feeding=feeding)


def _same_feeding(a: Feeding, b: Feeding) -> bool:
    return dict(a.batch_axes) == dict(b.batch_axes) and a.constants.keys() == b.constants.keys() and all(
        np.array_equal(a.constants[k], b.constants[k]) for k in a.constants
    )


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
        arrays, feeding = _checked_arrays(path, _read_file(path, [s.name for s in specs]), specs)
        labels = arrays.pop(LABEL_KEY, None)
        samples = SampleSet(arrays, None if labels is None else as_labels(labels), str(path), feeding)
    n = len(samples)
    if n < min_samples:
        raise CalibrationDataError(f"{path}: {n} samples; at least {min_samples} are needed")
    if want_labels and samples.labels is None:
        raise CalibrationDataError(f"{path}: no {LABEL_KEY!r} array; accuracy needs labels")
    return samples
