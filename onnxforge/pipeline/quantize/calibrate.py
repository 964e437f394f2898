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
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime import quantization as ortq

from onnxforge.errors import CalibrationDataError
from onnxforge.model_io import TensorSpec, input_specs
from onnxforge.pipeline.calibration import (
    CalibrationReader,
    ImageFolder,
    SampleSet,
    StreamedSamples,
    load_samples,
    model_batch_size,
    open_calibration,
)
from onnxforge.pipeline.quantize.backends import error_line, op_types_to_quantize
from onnxforge.pipeline.quantize.calibration_ranges import collect_ranges
from onnxforge.pipeline.quantize.config import CalibrationMethod, QuantizeConfig, Ranges

__all__ = ["CalibrationData", "collect", "data_notes", "load_calibration", "preprocess"]


@dataclass
class CalibrationData:
    """The samples of one quantize() call: the calibration part (possibly streamed), the held-out
    part (in memory), and the batch the model takes."""

    specs: Sequence[TensorSpec]
    calib: SampleSet | StreamedSamples
    held_out: SampleSet
    source: str  # where the samples came from, for error messages
    batch: int
    fixed_batch: bool

    def reader(self, count: int | None = None) -> CalibrationReader:
        """Batches of the calibration part (its first ``count`` samples when given)."""
        samples = self.calib if count is None else self.calib.take(slice(0, min(count, len(self.calib))))
        return CalibrationReader(samples, self.batch, fixed_batch=self.fixed_batch)

    def analysis_batches(self, count: int) -> Iterator[dict]:
        """The first ``count`` calibration samples in batches: what the per-node error is measured on."""
        return iter(self.reader(count).get_next, None)


def load_calibration(model: onnx.ModelProto, calibration: object, config: QuantizeConfig) -> CalibrationData:
    """Open ``calibration`` for ``model`` (checking ``max_memory`` first) and split off the held-out samples."""
    specs = input_specs(model)
    wanted = config.calibration_samples
    if config.eval_data is None:
        wanted += _max_held_out(config)
    if config.max_memory is not None:  # a clear error before loading, not the OOM killer during calibration
        from onnxforge.pipeline.quantize.calibration_memory import guard_calibration_memory

        guard_calibration_memory(model, specs, calibration, config.max_memory, config.calibration_samples)
    source = open_calibration(calibration, specs, limit=wanted)
    calib, held_out = _split_eval(config, model, source)
    if len(calib) > config.calibration_samples:
        calib = calib.take(slice(0, config.calibration_samples))
    if isinstance(calibration, (str, os.PathLike)) and Path(calibration).is_file():
        calib = calib.materialize()  # at most calibration_samples, read once (a folder streams, one file at a time)
    if len(calib) == 0:
        raise CalibrationDataError(f"{source.source}: no calibration samples left after holding out evaluation ones")
    fixed_batch = model_batch_size(specs, preferred=0) != 0
    batch = model_batch_size(specs, preferred=min(16, len(calib)))
    return CalibrationData(specs, calib, held_out, source.source, batch, fixed_batch)


def _split_eval(
    config: QuantizeConfig, model: onnx.ModelProto, calibration: SampleSet | StreamedSamples
) -> tuple[SampleSet | StreamedSamples, SampleSet]:
    """(calibration part, held-out samples in memory), both bounded (see the module doc)."""
    if config.eval_data is not None:
        held_out = load_samples(config.eval_data, input_specs(model), allow_ragged=True, limit=config.max_samples)
        return calibration, held_out
    if len(calibration) < 2:
        raise CalibrationDataError(
            f"{calibration.source}: {len(calibration)} sample(s): too few to both calibrate and check accuracy",
            hint="give at least 10 samples, or a separate --eval file",
        )
    calib, held_out = calibration.split(config.holdout_fraction, max_fit=config.calibration_samples,
                                        max_held=_max_held_out(config))
    return calib, held_out.materialize()


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
    model_path: Path, method: CalibrationMethod, data: CalibrationData, config: QuantizeConfig, cache: Path
) -> tuple[Ranges, int]:
    """The activation ranges of ``model_path`` on the calibration samples, written to ``cache``;
    returns them and the calibration batches run."""
    reader = data.reader()
    try:
        batches = collect_ranges(
            model_path,
            iter(reader.get_next, None),
            method.to_ort(),
            cache,
            op_types=op_types_to_quantize(model_path, config.exclude_op_types),
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
    errors = []
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

