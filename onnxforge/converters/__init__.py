"""Framework -> ONNX. The only place that imports torch or keras.

``export(source, output, config)`` loads SOURCE (``file.py:callable``, TorchScript ``.pt``,
``.keras``, or ``.onnx``), exports it, checks parity against the source framework on the same
inputs (at two batch sizes when the batch is dynamic), and saves the model atomically. A parity
failure keeps the file and raises QualityGateError (exit 4).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from onnxforge._atomic import check_output_path
from onnxforge.converters.config import Exporter, ExportConfig, ExportResult
from onnxforge.converters.source import SourceKind, SourceModel, resolve_source
from onnxforge.errors import CalibrationDataError, ExportError, QualityGateError
from onnxforge.model_io import default_opset, input_specs, load_model, output_specs, save_model
from onnxforge.parity import ParityReport, compare_outputs
from onnxforge.targets import CpuTarget
from onnxforge.targets.feeds import generate_feeds

__all__ = ["export", "ExportConfig", "ExportResult", "Exporter", "resolve_source", "SourceKind"]


def _sample_feeds(config: ExportConfig, model: onnx.ModelProto) -> list[dict[str, np.ndarray]] | None:
    if config.sample_inputs is None:
        return None
    try:
        with np.load(config.sample_inputs) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise CalibrationDataError(f"{config.sample_inputs}: not a readable .npz ({type(e).__name__})") from e
    names = [s.name for s in input_specs(model)]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationDataError(
            f"{config.sample_inputs}: no array for model input {missing[0]!r} (has: {', '.join(arrays)})"
        )
    return [{n: arrays[n][:2] for n in names}]


def _parity_feeds(config: ExportConfig, model: onnx.ModelProto, examples: dict | None) -> list[dict[str, np.ndarray]]:
    sampled = _sample_feeds(config, model)
    if sampled is not None:
        return sampled
    specs = input_specs(model)
    if examples is not None and not any(isinstance(d, str) or d is None for s in specs for d in s.shape[1:]):
        shapes = {k: tuple(v.shape[1:]) for k, v in examples.items()}
        overrides_for = lambda b: {k: (b, *shape) for k, shape in shapes.items() if k in {s.name for s in specs}}  # noqa: E731
    else:
        overrides_for = lambda b: {  # noqa: E731
            k: (b, *v[1:]) for k, v in config.input_shapes.items() if k in {s.name for s in specs}
        }
    dynamic_batch = any(s.shape and not isinstance(s.shape[0], int) for s in specs)
    batches = (1, 3) if dynamic_batch else (None,)
    feeds = []
    for batch in batches:
        if batch is None:
            feeds.append(generate_feeds(specs, batch=1, overrides={}, seed=1))
        else:
            feeds.append(generate_feeds(specs, batch=batch, overrides=overrides_for(batch), seed=1))
    if examples is not None:
        # keep the dtypes torch was exported with (e.g. int64 token ids)
        for feed in feeds:
            for k, v in feed.items():
                if k in examples:
                    feed[k] = v.astype(examples[k].numpy().dtype, copy=False)
    return feeds


def _check_parity(source: SourceModel, proto: onnx.ModelProto, config: ExportConfig, examples) -> ParityReport:
    session = CpuTarget().session(proto.SerializeToString())
    onnx_outputs = [o.name for o in session.get_outputs()]
    report: ParityReport | None = None
    for feed in _parity_feeds(config, proto, examples):
        if source.kind is SourceKind.KERAS:
            from onnxforge.converters.keras_export import run_keras

            reference = run_keras(source.model, feed)
        else:
            from onnxforge.converters.torch_export import run_torch

            reference = run_torch(source.model, feed)
        got = session.run(None, feed)
        batch = int(next(iter(feed.values())).shape[0]) if feed else 1
        part = compare_outputs(onnx_outputs, reference, got, config.tolerance, batch)
        report = part if report is None else report.merged(part)
    assert report is not None
    return report


def export(source: str | os.PathLike, output: str | os.PathLike, config: ExportConfig = ExportConfig()) -> ExportResult:
    """Export SOURCE to ONNX at ``output`` and verify it. See the module docstring."""
    src = resolve_source(source)
    out = check_output_path(output, src.path) if src.path else check_output_path(output)
    fallback = None
    examples = None
    notes: list[str] = []
    if src.kind is SourceKind.ONNX:
        proto = load_model(src.path)
        exporter = "none (ONNX input)"
        CpuTarget().session(str(src.path))  # must load in onnxruntime
    elif src.kind is SourceKind.KERAS:
        from onnxforge.converters.keras_export import export_keras

        proto = export_keras(src.model)
        exporter = "keras"
    else:
        from onnxforge.converters.torch_export import export_torch

        proto, exporter, fallback, examples, _ = export_torch(src.model, config, src.example_inputs)
        if fallback:
            notes.append(f"dynamo exporter failed ({fallback}); the TorchScript exporter produced this file")
        if config.opset and config.opset < 18 and exporter == "dynamo":
            notes.append(f"asked for opset {config.opset}; the dynamo exporter produces opset {default_opset(proto)}")
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported model fails the ONNX checker: {str(e).splitlines()[0]}") from e
    parity = None
    if config.check_parity and src.kind is not SourceKind.ONNX:
        parity = _check_parity(src, proto, config, examples)
    save_model(proto, out)
    result = ExportResult(
        path=out,
        source_kind=src.kind.value,
        exporter=exporter,
        parity=parity,
        inputs=input_specs(proto),
        outputs=output_specs(proto),
        opset=default_opset(proto),
        fallback_reason=fallback,
        notes=notes,
    )
    if parity is not None and not parity.ok:
        raise QualityGateError(
            f"export of {source}: {parity.summary()}; the file is kept at {out} but is UNVERIFIED",
            hint="inspect the op that drifts, or loosen --atol/--rtol if the error is acceptable",
            best_path=str(out),
        )
    return result
