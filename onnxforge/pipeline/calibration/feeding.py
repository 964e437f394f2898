"""Inputs as models declare them: per-sample arrays, constants, and batches on another axis.

The data convention (an ``.npz``, or each file of a folder; keys are model input names):

- ``NAME``: per-sample values, samples on the first axis (``[N, *one sample]``). A batch of samples
  is stacked on the model's *batch axis*: axis 0, unless axis 0 is fixed and another axis is dynamic
  and the samples fit there (a recurrent state declared ``[2, batch, 128]`` takes ``[N, 2, 128]``).
- ``NAME@K``: the same, with the batch axis K said explicitly (``state@1``).
- ``NAME@const``: one array fed unchanged with every batch, in the model's declared shape (a sample
  rate ``sr@const = 16000``, a fixed initial state). A 0-d array for a scalar input is a constant
  too, and so is a per-sample array for a scalar input whose values are all equal.

Every stage that reads data (quantize, prune, low rank, simplify, profile, the runner) batches and
feeds it through ``Feeding``, so a constant is honoured everywhere: a sample rate is never replaced
by a random number that takes an ``If`` down the wrong branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec

__all__ = ["CONST_SUFFIX", "Feeding", "batch_axis_for", "parse_key"]

CONST_SUFFIX = "@const"


@dataclass(frozen=True)
class Feeding:
    """How per-sample arrays (samples on axis 0) become a model's feeds.

    ``constants``: inputs fed the same array with every batch; ``batch_axes``: inputs whose batch is
    not on axis 0 (a batch is stacked on axis 0, then moved there).
    """

    constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    batch_axes: Mapping[str, int] = field(default_factory=dict)

    def feeds(self, stacked: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model feeds from a batch of per-sample arrays stacked on axis 0."""
        out = {}
        for name, value in stacked.items():
            axis = self.batch_axes.get(name, 0)
            out[name] = np.ascontiguousarray(np.moveaxis(value, 0, axis)) if axis else value
        out.update(self.constants)
        return out

    def batch_size(self, feeds: Mapping[str, np.ndarray]) -> int:
        """How many samples a batch of feeds holds (read on a per-sample input's batch axis)."""
        for name, value in feeds.items():
            if name not in self.constants:
                return int(value.shape[self.batch_axes.get(name, 0)]) if value.ndim else 1
        return 1

    def resized(self, feeds: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        """``feeds`` with every per-sample input repeated cyclically (or cut) to ``size`` samples."""
        out = {}
        for name, value in feeds.items():
            if name in self.constants:
                out[name] = value
                continue
            axis = self.batch_axes.get(name, 0)
            moved = np.moveaxis(value, axis, 0)
            out[name] = np.ascontiguousarray(np.moveaxis(np.resize(moved, (size, *moved.shape[1:])), 0, axis))
        return out

    def describe(self) -> list[str]:
        """One phrase per input fed another way than 'samples on axis 0'."""
        notes = [f"{k} = constant {_value_text(v)}" for k, v in self.constants.items()]
        notes += [f"{k}: batch on axis {a}" for k, a in self.batch_axes.items() if a]
        return notes


def _value_text(value: np.ndarray) -> str:
    return str(value.item()) if value.size == 1 else f"of shape {'x'.join(map(str, value.shape))}"


def parse_key(key: str) -> tuple[str, str | int | None]:
    """``NAME`` -> (NAME, None); ``NAME@const`` -> (NAME, 'const'); ``NAME@K`` -> (NAME, K)."""
    name, sep, mode = key.rpartition("@")
    if not sep or not name:
        return key, None
    if mode == "const":
        return name, "const"
    if mode.isdigit():
        return name, int(mode)
    return key, None  # an '@' that is part of the name


def _fits(declared: Sequence[int | str | None], actual: Sequence[int]) -> bool:
    return len(declared) == len(actual) and all(
        not isinstance(d, int) or d == a for d, a in zip(declared, actual, strict=True)
    )


def batch_axis_for(spec: TensorSpec, sample_shape: Sequence[int]) -> int:
    """The axis a batch of samples of ``sample_shape`` goes to: 0, unless axis 0 is fixed and a
    dynamic axis fits the samples (``[2, batch, 128]`` with samples of ``[2, 128]``: 1)."""
    dims = list(spec.shape)
    dynamic = [a for a, d in enumerate(dims) if not isinstance(d, int)]
    if not dims or 0 in dynamic or not dynamic:
        return 0
    for axis in dynamic:
        if _fits(dims[:axis] + dims[axis + 1 :], sample_shape):
            return axis
    return 0


def check_constant(where: str, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """A constant input's array: the model's rank and fixed dims, cast to its dtype."""
    if array.dtype.kind not in "biuf":
        raise CalibrationDataError(f"{where} has dtype {array.dtype}; expected {spec.dtype}")
    if array.ndim != len(spec.shape) or not _fits(spec.shape, array.shape):
        raise CalibrationDataError(
            f"{where} is a constant of shape {'x'.join(map(str, array.shape)) or 'scalar'}; the model declares "
            f"{spec.shape_text()}",
            hint="a constant is fed as-is with every batch: give it in the model's own shape",
        )
    if spec.dtype.kind in "biuf":
        array = array.astype(spec.dtype, copy=False)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise CalibrationDataError(f"{where} holds NaN/Inf values")
    return np.array(array, order="C")  # ascontiguousarray would make a 0-d array 1-d
