"""Calibration for one quantize() call: the samples, the fp32 model prepared for onnxruntime's
quantizers, and its activation ranges.

The samples: the first ``max_samples`` (256 when unset) calibrate; quality is scored on the first
``max_samples`` of ``eval_data`` (all of it when unset), or, without it, on the calibration samples
right after those (``holdout_fraction`` of them, held out of calibration; see
calibration.split_bounds). No data file is read past what is used.
The model: ``quant_pre_process`` (optimization + shape inference, which ``quantize_static`` needs to
quantize activations at all), with fallbacks for dynamo/TorchScript exports (graphs builds the
transformer variants on it). The ranges: one pass over the samples, one batch at a time
(calibration_ranges), written as onnxruntime's calibration cache that static candidates read; once
per graph and method.

Memory: a plan (memory_plan) made from the first samples' real shapes sizes every batch to
``max_memory``, or without it to a share of the memory available at the start.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime import quantization as ortq

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec, input_specs
from onnxforge.pipeline.calibration import (
    CalibrationReader,
    ImageFolder,
    SampleSet,
    StreamedSamples,
    model_batch_size,
    open_calibration,
)
from onnxforge.pipeline.data_spec import DataKind, DataSpec, as_data_spec, load_data
from onnxforge.pipeline.progress import Progress, counted, ignore
from onnxforge.pipeline.quantize.backends import error_line, op_types_to_quantize
from onnxforge.pipeline.quantize.calibration_ranges import collect_ranges
from onnxforge.pipeline.quantize.config import CalibrationMethod, QuantizeConfig, Ranges
from onnxforge.pipeline.quantize.memory_plan import (
    DEFAULT_SHARE,
    MemoryPlan,
    available_memory,
    plan_memory,
    tensor_sizes,
)

__all__ = ["CalibrationData", "collect", "data_notes", "load_calibration", "preprocess"]


@dataclass
class CalibrationData:
    """The samples of one quantize() call: the calibration part (possibly streamed), the held-out
    part (in memory), the batch the model takes, and the memory plan that sizes each phase's batch
    (None where the memory available cannot be read)."""

    specs: Sequence[TensorSpec]
    calib: SampleSet | StreamedSamples
    held_out: SampleSet
    source: str  # where the samples came from, for error messages
    batch: int
    fixed_batch: bool
    plan: MemoryPlan | None = field(default=None, repr=False)

    @property
    def low_memory(self) -> bool:
        """Sessions that score or analyse run without onnxruntime's CPU arena (under a plan)."""
        return self.plan is not None

    def reader(self, count: int | None = None, batch: int | None = None) -> CalibrationReader:
        """Batches of the calibration part (its first ``count`` samples when given; ``batch`` samples each,
        else the model's batch)."""
        samples = self.calib if count is None else self.calib.take(slice(0, min(count, len(self.calib))))
        return CalibrationReader(samples, batch or self.batch, fixed_batch=self.fixed_batch)

    def eval_batch(self) -> int:
        """The batch held-out samples are scored at: what fits what is left of the memory limit."""
        fixed = model_batch_size(self.specs, preferred=0)
        return fixed or (self.plan.eval_batch(self.source, min(32, len(self.held_out))) if self.plan else 32)

    def statistics_batch(self) -> int | None:
        """The batch for runs that return some activations (smoothing statistics, fusion parity), sized
        now; None when not even one sample fits what is left of the memory limit."""
        return self.plan.statistics_batch() if self.plan else self.batch

    def refusal(self, phase: str) -> str:
        """Why the memory plan refused ``phase`` (a sized batch or analysis was None); only a plan refuses."""
        if self.plan is None:
            raise ValueError(f"{phase} was not refused: there is no memory plan")
        return self.plan.refusal(phase)

    def analysis_size(self) -> tuple[int, int] | None:
        """(batch, passes over the nodes) for the per-node error analysis, sized now; None when it does
        not fit what is left of the memory limit."""
        return self.plan.analysis_size() if self.plan else (self.batch, 1)

    def batches(self, count: int, batch: int) -> Callable[[], Iterator[dict]]:
        """The first ``count`` calibration samples in batches of ``batch``, afresh on each call."""
        return lambda: iter(self.reader(count, batch).get_next, None)

    def tensor_sizes(self, model_path: Path) -> dict[str, int]:
        """Bytes per sample of the activations of the model at ``model_path`` at the data's shapes."""
        shapes = self.plan.input_shapes if self.plan else {}
        return tensor_sizes(onnx.load(str(model_path), load_external_data=False), shapes)


def load_calibration(model: onnx.ModelProto, calibration: object, config: QuantizeConfig) -> CalibrationData:
    """Open ``calibration`` for ``model`` (checking ``max_memory`` first) and split off the held-out samples."""
    specs = input_specs(model)
    wanted = config.calibration_samples
    if config.eval_data is None:
        wanted += _max_held_out(config)
    if config.max_memory is not None:  # a clear error before loading, not the OOM killer during calibration
        from onnxforge.pipeline.quantize.calibration_memory import guard_calibration_memory

        guard_calibration_memory(model, specs, calibration, config.max_memory, wanted)  # the rows read
    source = open_calibration(calibration, specs, limit=wanted)
    calib, held_out = _split_eval(config, model, source)
    if len(calib) > config.calibration_samples:
        calib = calib.take(slice(0, config.calibration_samples))
    spec = as_data_spec(calibration) if isinstance(calibration, (str, os.PathLike, DataSpec)) else None
    if spec is not None and spec.path is not None and spec.path.is_file():
        calib = calib.materialize()  # at most calibration_samples, read once (a folder streams, one file at a time)
    if len(calib) == 0:
        raise CalibrationDataError(f"{source.source}: no calibration samples left after holding out evaluation ones")
    fixed_batch = model_batch_size(specs, preferred=0) != 0
    batch = model_batch_size(specs, preferred=min(16, len(calib)))
    plan = _memory_plan(model, config, calib, held_out, source, batch, fixed_batch)
    return CalibrationData(specs, calib, held_out, source.source, batch, fixed_batch, plan)


def _samples_bytes(samples: SampleSet | StreamedSamples) -> int:
    """Bytes of samples held in memory: all of a SampleSet; of a stream, about a file and a batch."""
    if isinstance(samples, StreamedSamples):
        return sum(int(np.asarray(v).nbytes) for v in samples.first_batch(1).values()) * 32
    return sum(
        sum(int(np.asarray(x).nbytes) for x in v) if v.dtype == object else int(v.nbytes)
        for v in samples.inputs.values()
    )


def _memory_plan(
    model: onnx.ModelProto, config: QuantizeConfig, calib, held_out: SampleSet, source, batch: int, fixed_batch: bool
) -> MemoryPlan | None:
    """Batches sized to ``max_memory`` (without it, a share of the available memory) from the first
    samples' shapes; CalibrationDataError when not even a forward pass at batch 1 fits."""
    limit, explicit = config.max_memory, config.max_memory is not None
    if limit is None:
        available = available_memory()
        if available is None:
            return None
        limit = int(available * DEFAULT_SHARE)
    shapes = {k: tuple(np.shape(v)) for k, v in calib.first_batch(1).items()}
    held = _samples_bytes(source)  # held-out samples split from an in-memory set are views of it
    if config.eval_data is not None or not isinstance(source, SampleSet):
        held += _samples_bytes(held_out)
    return plan_memory(model, shapes, held, limit, batch=batch, fixed_batch=batch if fixed_batch else None,
                       explicit=explicit, source=source.source)


def _split_eval(
    config: QuantizeConfig, model: onnx.ModelProto, calibration: SampleSet | StreamedSamples
) -> tuple[SampleSet | StreamedSamples, SampleSet]:
    """(calibration part, held-out samples in memory), both bounded (see the module doc)."""
    if config.eval_data is not None:
        held_out = load_data(config.eval_data, input_specs(model), allow_ragged=True, limit=config.max_samples)
        return calibration, held_out
    if len(calibration) < 2:
        raise CalibrationDataError(
            f"{calibration.source}: {len(calibration)} sample(s): too few to both calibrate and check accuracy",
            hint="give at least 10 samples, or a separate --eval file",
        )
    calib: SampleSet | StreamedSamples
    rest: SampleSet | StreamedSamples
    calib, rest = calibration.split(config.holdout_fraction, max_fit=config.calibration_samples,
                                    max_held=_max_held_out(config))
    return calib, rest.materialize()


def _max_held_out(config: QuantizeConfig) -> int:
    """Held-out samples at most, without eval data: in proportion to the calibration samples (64 for 256)."""
    fraction = config.holdout_fraction
    return max(1, math.ceil(config.calibration_samples * fraction / (1.0 - fraction)))


def data_notes(calibration: object, config: QuantizeConfig, data: CalibrationData) -> list[str]:
    """What the result should say about the data: inputs fed as constants or batched on another axis, a poor
    calibration method, image preprocessing, holdout."""
    notes = list(data.calib.feeding.describe())
    if config.calibration_method is CalibrationMethod.DISTRIBUTION:
        notes.append(
            "onnxruntime's Distribution calibration computes statistics meant for float8 types; with int8 it "
            "left the digits CNN at 10% accuracy (MinMax: 99.8%): prefer minmax, entropy or percentile"
        )
    if isinstance(calibration, DataSpec) and calibration.resolved_kind() is DataKind.IMAGES:
        calibration = ImageFolder(calibration.path, calibration.preprocessing)  # the same note as the API's
    if isinstance(calibration, ImageFolder):
        pre = calibration.preprocessing
        notes.append(
            f"calibration images from {calibration.path}: resized to "
            f"{'x'.join(map(str, pre.size)) if pre.size else 'the model input size'}, x{pre.scale:g}, "
            f"mean {list(pre.mean)}, std {list(pre.std)}, layout {pre.layout.value}"
        )
    if config.eval_data is None:
        notes.append(
            f"no --eval data: quality measured on {len(data.held_out)} calibration samples, held out of calibration"
        )
    elif config.max_samples is not None and len(data.held_out) >= config.max_samples:
        notes.append(f"quality measured on the first {len(data.held_out)} samples of {config.eval_data} "
                     "(max_samples, --max-samples)")
    return notes


def collect(
    model_path: Path, method: CalibrationMethod, data: CalibrationData, config: QuantizeConfig, cache: Path,
    progress: Progress = ignore,
) -> tuple[Ranges, int]:
    """The activation ranges of ``model_path`` on the calibration samples, written to ``cache``;
    returns them and the calibration batches run. Under a memory plan the batch and the passes over
    the tensors are sized now, from the memory resident after pre-processing and earlier candidates."""
    batch, groups, sizes = data.batch, 1, None
    if data.plan is not None:
        batch, groups = data.plan.calibration_batch(data.source, histogram=method is not CalibrationMethod.MINMAX)
        if groups > 1:  # shares balanced by the sizes of this graph's tensors at the data's shapes
            sizes = data.tensor_sizes(model_path)
    total = -(-len(data.calib) // max(1, batch or 1))
    phase = f"calibrating ({method.value})" + (f", {groups} passes over the tensors" if groups > 1 else "")
    try:
        batches = collect_ranges(
            model_path,
            lambda: counted(progress, phase, iter(data.reader(batch=batch).get_next, None), total),
            method.to_ort(),
            cache,
            op_types=op_types_to_quantize(model_path, config.exclude_op_types),
            tensor_groups=groups,
            tensor_sizes=sizes,
            low_memory=data.low_memory,
        )
    except CalibrationDataError:
        raise
    except Exception as e:
        raise CalibrationDataError(f"{data.source}: {method.value} calibration failed: {error_line(e)}") from e
    return Ranges(cache, method), batches


def preprocess(model: onnx.ModelProto, folder: Path, notes: list[str]) -> Path:
    """quant_pre_process with the fallbacks dynamo/TorchScript exports need; returns the model path.

    Nameless nodes get names (``nodes_to_exclude`` and the error report address nodes by name).
    """
    src = folder / "fp32.onnx"
    onnx.save_model(model, str(src))
    out = folder / "fp32_pre.onnx"
    attempts = [
        ("symbolic shape inference", {}),
        ("symbolic shape inference with auto-merge", {"auto_merge": True}),
        ("ONNX shape inference only", {"skip_symbolic_shape": True}),
    ]
    errors: list[str] = []
    chosen = src
    for label, kwargs in attempts:
        try:
            # on failure symbolic shape inference saves "sym_shape_infer_temp.onnx" (and external
            # data) into the working folder: keep that inside our temporary folder
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    contextlib.chdir(folder):
                ortq.quant_pre_process(str(src), str(out), **kwargs)
            if errors:
                notes.append(f"pre-processing used {label} ({errors[-1]})")
            chosen = out
            break
        except Exception as e:
            errors.append(f"{label} failed: {type(e).__name__}")
    else:
        notes.append("quant_pre_process failed (" + "; ".join(errors) + "); quantizing the model as given")
    name_nodes(chosen)
    return chosen


def name_nodes(path: Path) -> None:
    """Give every nameless node of the model at ``path`` a unique name (saved in place)."""
    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    changed = False
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            changed = True
    if changed:
        onnx.save_model(model, str(path))

