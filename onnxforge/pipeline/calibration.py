"""Calibration and evaluation data: loading, checking against the model, and feeding onnxruntime.

Format: an ``.npz`` with one array per model input, keyed by input name, first axis = samples
(other arrays, such as ``label``, are ignored as inputs), or a folder of such ``.npz``/``.npy``
files whose samples are concatenated in sorted file order (a ``.npy`` file feeds the model's only
input). Every problem is a CalibrationDataError that names the file, the input and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec

__all__ = ["SampleSet", "load_samples", "CalibrationReader", "LABEL_KEY"]

LABEL_KEY = "label"


@dataclass(frozen=True)
class SampleSet:
    """Arrays keyed by model input name (first axis = samples), plus optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def take(self, index: slice | np.ndarray) -> SampleSet:
        labels = None if self.labels is None else self.labels[index]
        return SampleSet({k: v[index] for k, v in self.inputs.items()}, labels, self.source)

    def split(self, holdout_fraction: float) -> tuple[SampleSet, SampleSet]:
        """(first part, last ``holdout_fraction`` part); deterministic, keeps order."""
        n = len(self)
        held = max(1, int(round(n * holdout_fraction)))
        return self.take(slice(0, n - held)), self.take(slice(n - held, n))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {k: np.ascontiguousarray(v[start : start + batch_size]) for k, v in self.inputs.items()}


def _read_arrays(path: Path, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            raise CalibrationDataError(f"{path}: folder holds no .npz or .npy files")
        parts = [_read_arrays(f, input_names) for f in files]
        keys = set(parts[0])
        for f, part in zip(files, parts):
            if set(part) != keys:
                raise CalibrationDataError(f"{f}: holds arrays {sorted(part)}, other files hold {sorted(keys)}")
        try:
            return {k: np.concatenate([p[k] for p in parts]) for k in keys}
        except ValueError as e:
            raise CalibrationDataError(f"{path}: files have arrays of different shapes: {e}") from e
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
    except Exception as e:
        raise CalibrationDataError(f"{path}: not a readable .npz/.npy file ({type(e).__name__})") from e


def _check_array(path: Path, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    where = f"{path}: input {spec.name!r}"
    if array.dtype.kind not in "biuf":
        raise CalibrationDataError(f"{where} has dtype {array.dtype}; expected {spec.dtype}")
    if spec.dtype.kind == "f" and array.dtype.kind == "f":
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
        raise CalibrationDataError(f"{where} holds {bad} NaN/Inf values")
    return array


def load_samples(
    path: str | os.PathLike, specs: Sequence[TensorSpec], *, min_samples: int = 1, want_labels: bool = False
) -> SampleSet:
    """Load and check samples for a model with inputs ``specs``."""
    path = Path(path)
    names = [s.name for s in specs]
    arrays = _read_arrays(path, names)
    missing = [n for n in names if n not in arrays]
    if missing:
        have = ", ".join(k for k in arrays) or "nothing"
        raise CalibrationDataError(
            f"{path}: no array for model input {missing[0]!r} (the file has: {have})",
            hint="the .npz must hold one array per model input, keyed by the input's name",
        )
    inputs = {s.name: _check_array(path, s, arrays[s.name]) for s in specs}
    counts = {n: len(a) for n, a in inputs.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{path}: inputs have different sample counts: {counts}")
    n = next(iter(counts.values()), 0)
    if n < min_samples:
        raise CalibrationDataError(f"{path}: {n} samples; at least {min_samples} are needed")
    # A model with a fixed batch > 1 takes samples in groups of that size.
    labels = arrays.get(LABEL_KEY)
    if labels is not None:
        labels = np.asarray(labels).reshape(len(labels), -1)[:, 0] if labels.ndim > 1 else np.asarray(labels)
        if len(labels) != n:
            raise CalibrationDataError(f"{path}: {len(labels)} labels for {n} samples")
    elif want_labels:
        raise CalibrationDataError(f"{path}: no {LABEL_KEY!r} array; accuracy needs labels")
    return SampleSet(inputs, labels, str(path))


def model_batch_size(specs: Sequence[TensorSpec], preferred: int) -> int:
    """The batch to feed: the model's fixed first dim if it has one, else ``preferred``."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    return fixed.pop() if len(fixed) == 1 else preferred


class CalibrationReader(CalibrationDataReader):
    """Feeds a SampleSet to onnxruntime's calibrators in batches, without copying it whole."""

    def __init__(self, samples: SampleSet, batch_size: int) -> None:
        self._samples = samples
        self._batch_size = batch_size
        self._iter: Iterator[Mapping[str, np.ndarray]] | None = None
        self.batches_read = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._samples.batches(self._batch_size)
        for batch in self._iter:
            if len(next(iter(batch.values()))) != self._batch_size and self.batches_read:
                return None  # a short last batch would break models with a fixed batch
            self.batches_read += 1
            return dict(batch)
        return None

    def rewind(self) -> None:
        self._iter = None
        self.batches_read = 0
