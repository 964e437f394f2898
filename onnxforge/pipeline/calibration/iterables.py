"""Samples from Python iterables (a list, a generator, a torch ``Dataset`` or ``DataLoader``), duck-typed.

Items are a mapping of input name to array, a tuple (inputs in order, then an optional label), or a
single array for a single-input model; arrays may be torch tensors (nothing here imports torch) and
may hold one sample or a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec
from onnxforge.pipeline.calibration.files import check_array
from onnxforge.pipeline.calibration.samples import LABEL_KEY, SampleSet, object_array

__all__ = ["samples_from_iterable"]


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
            return dict(zip(names, item, strict=True)), None
        if len(item) == len(names) + 1:
            return dict(zip(names, item[: len(names)], strict=True)), item[-1]
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
            array = check_array(where, spec, array)
            if batch is not None and len(array) != batch:
                raise CalibrationDataError(f"{where}: inputs have different batch sizes")
            batch = len(array)
            rows[spec.name].extend(array)
        if label is None:
            has_labels = False
        else:
            label_array = _to_numpy(label, f"{where} label").reshape(-1)
            # batch is None only for a model without inputs: its labels are taken as given
            labels.extend(label_array if batch is None or len(label_array) == batch else np.resize(label_array, batch))
        taken += batch or 0
        if taken >= limit:
            break
    if taken == 0:
        raise CalibrationDataError(f"{source}: the iterable yielded no samples")
    inputs = {}
    for name, items in rows.items():
        items = items[:limit]
        inputs[name] = np.stack(items) if len({a.shape for a in items}) == 1 else object_array(items)
    kept_labels = np.asarray(labels[:limit]) if has_labels and labels else None
    return SampleSet(inputs, kept_labels, source)
