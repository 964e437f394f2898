"""How much memory calibration needs, estimated before it starts, so that ``--max-memory`` can
refuse with a clear error instead of the run being OOM-killed.

The estimate adds what calibration holds at its peak (calibration_ranges, beside this module,
feeds one batch at a time):

- the samples in memory: an ``.npz`` is loaded whole; a folder is streamed, so only its largest
  file and one batch are held;
- one batch of activations, twice: onnxruntime's augmented model returns every intermediate
  tensor of the batch (its arena holds them, then numpy copies them out);
- the model four times (the loaded proto, the pre-processed copy, the augmented model and its
  session);
- a fixed baseline for Python, numpy and onnxruntime (400 MB: ~95 MB after imports, ~360 MB once
  ``quant_pre_process`` has imported sympy and torch).

Activation sizes come from ONNX shape inference with the batch dimension per sample; tensors
whose other dims stay unknown are left out, so for such models the estimate is a lower bound,
and says so. This check runs before any sample is read (from the files' headers) at batch 1, the
least the run can use; once the first samples are read, memory_plan sizes every batch from their
real shapes. benchmarks/calibration_memory.py compares the estimate with measured peak RSS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxforge.errors import CalibrationDataError, UsageError

__all__ = [
    "MemoryEstimate",
    "check_calibration_memory",
    "estimate_calibration_memory",
    "guard_calibration_memory",
    "parse_memory_size",
]

BASELINE_BYTES = 400 << 20  # measured: ~95 MB after imports, ~360 MB after quant_pre_process (sympy, torch)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40}


def parse_memory_size(text: str, option: str = "--max-memory") -> int:
    """``512M``, ``2G``, ``1.5GB``, ``1000000`` (bytes) -> bytes (binary units); ``option`` names the
    setting in the UsageError."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"{option} {text!r}: expected a size such as 512M, 2G or 1.5GB")
    size = int(float(match[1]) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"{option} {text!r}: must be more than 0")
    return size


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    samples_bytes: int  # calibration samples held at once
    activation_bytes_per_sample: int
    batch: int
    model_bytes: int
    unknown_tensors: int  # activations left out because their shape is unknown

    @property
    def batch_bytes(self) -> int:
        return 2 * self.batch * self.activation_bytes_per_sample

    @property
    def total(self) -> int:
        return BASELINE_BYTES + self.samples_bytes + self.batch_bytes + 4 * self.model_bytes

    def describe(self) -> str:
        text = (f"about {_gib(self.total)} ({_gib(self.samples_bytes)} of samples, {_gib(self.batch_bytes)} of "
                f"activations for a batch of {self.batch}, {_gib(4 * self.model_bytes)} of model copies, "
                f"{_gib(BASELINE_BYTES)} baseline)")
        if self.unknown_tensors:
            text += f"; a lower bound: {self.unknown_tensors} activation(s) have unknown shapes"
        return text


def _activation_bytes_per_sample(model: onnx.ModelProto) -> tuple[int, int]:
    """(bytes of every intermediate and output tensor for one sample, count of tensors left out)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    total, unknown = 0, 0
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        if vi.name in initializers or vi.name in graph_inputs:
            continue
        tensor_type = vi.type.tensor_type
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
        except Exception:
            unknown += 1
            continue
        dims = list(tensor_type.shape.dim)
        elements = 1
        for axis, d in enumerate(dims):
            if d.HasField("dim_value"):
                elements *= d.dim_value if axis or len(dims) == 1 else 1  # axis 0 is the batch
            elif axis == 0:
                continue  # the dynamic batch: per sample
            else:
                elements = -1
                break
        if elements < 0 or not tensor_type.HasField("shape"):
            unknown += 1
            continue
        total += elements * itemsize
    return total, unknown


def estimate_calibration_memory(
    model: onnx.ModelProto, samples_bytes: int, batch: int
) -> MemoryEstimate:
    """The estimate for calibrating ``model`` with ``samples_bytes`` of samples held in memory."""
    per_sample, unknown = _activation_bytes_per_sample(model)
    return MemoryEstimate(samples_bytes, per_sample, batch, model.ByteSize(), unknown)


def check_calibration_memory(
    model: onnx.ModelProto, samples_bytes: int, batch: int, limit: int, source: str
) -> MemoryEstimate:
    """CalibrationDataError naming ``source`` when the estimate exceeds ``limit`` bytes."""
    estimate = estimate_calibration_memory(model, samples_bytes, batch)
    if estimate.total > limit:
        raise CalibrationDataError(
            f"{source}: calibration would need {estimate.describe()}, over --max-memory {_gib(limit)}",
            hint="calibrate on a smaller .npz, or a folder of .npz files (read one file at a time)",
        )
    return estimate


def _npz_array_bytes(path, rows: int | None = None) -> int:
    """Bytes of every array in an .npz/.npy that reading its first ``rows`` samples loads (all of
    them without ``rows``), from the headers (nothing is loaded): only the rows used are read."""
    import zipfile

    def header_bytes(f) -> int:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
        if rows is not None and shape:
            shape = (min(shape[0], rows), *shape[1:])
        return int(np.prod(shape, dtype=np.float64)) * dtype.itemsize

    try:
        if str(path).endswith(".npy"):
            with open(path, "rb") as f:
                return header_bytes(f)
        with zipfile.ZipFile(path) as archive:
            total = 0
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as member_file:
                        total += header_bytes(member_file)
            return total
    except Exception:
        return 0  # unreadable: loading it reports the problem


def guard_calibration_memory(
    model: onnx.ModelProto, specs, calibration, limit: int, max_samples: int
) -> MemoryEstimate:
    """Check the estimate against ``limit`` before any sample is loaded (files are sized from their
    headers, as far as the ``max_samples`` rows read; a folder is streamed, so its largest file
    counts). Iterables are not sized."""
    from pathlib import Path

    from onnxforge.pipeline.calibration import model_batch_size

    batch = model_batch_size(specs, preferred=1)  # memory_plan lowers the batch to what fits
    from onnxforge.pipeline.data_spec import DataKind, DataSpec

    samples_bytes, source = 0, "calibration data"
    if isinstance(calibration, DataSpec) and calibration.resolved_kind() is DataKind.ARRAYS:
        calibration = calibration.path  # an image folder is streamed one file at a time: not sized here
    if isinstance(calibration, (str, Path)) or hasattr(calibration, "__fspath__"):
        path = Path(calibration)
        source = str(path)
        if path.is_file():
            samples_bytes = _npz_array_bytes(path, max_samples)
        elif path.is_dir():
            files = [p for p in path.iterdir() if p.suffix in (".npz", ".npy")]
            samples_bytes = max((_npz_array_bytes(p, max_samples) for p in files), default=0)
    return check_calibration_memory(model, samples_bytes, batch, limit, source)
