"""Framework -> ONNX. The only place that imports torch or keras.

``export(source, output, config)`` loads SOURCE (``file.py:callable``, TorchScript ``.pt``,
``torch.export`` ``.pt2``, ``.keras``, ``.onnx``, or a Hugging Face folder), exports it,
runs the full ONNX checker, checks parity against the source framework on the same inputs (at two
sizes of every dynamic dim: batch 1 and 3, and a second sequence length), and saves the model atomically.

A parity failure keeps the file, marked unverified twice: ``metadata_props["onnxforge.verified"] =
"false"`` inside the model, and ``<out>.unverified.json`` beside it with the report; then it raises
QualityGateError (exit 4). A later verified export to the same path removes a stale note.

A ``file.py:callable`` source runs the user's code: that export runs in a child process (see
``_isolation``), so the code cannot end, hang or hold up this process unreported.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxforge._atomic import atomic_write_text, check_output_path, paths_in
from onnxforge.converters._isolation import SOURCE_TIMEOUT_S
from onnxforge.converters._parity_inputs import parity_feeds, sample_feeds
from onnxforge.converters.config import ExportConfig, Exporter, ExportResult
from onnxforge.converters.source import SourceKind, SourceModel, is_python_source, resolve_source, source_files
from onnxforge.errors import ExportError, InvalidModelError, QualityGateError, UsageError
from onnxforge.model_io import (
    default_opset,
    fits_in_protobuf,
    infer_shapes,
    input_specs,
    load_model,
    output_specs,
    save_model,
)
from onnxforge.parity import OutputParity, ParityReport, compare_outputs
from onnxforge.targets import CpuTarget

__all__ = [
    "VERIFIED_KEY",
    "ExportConfig",
    "ExportResult",
    "Exporter",
    "SourceKind",
    "export",
    "resolve_source",
    "unverified_note_path",
]

VERIFIED_KEY = "onnxforge.verified"  # metadata_props entry set to "false" when parity failed
PARITY_KEY = "onnxforge.parity"


def _parity_feeds(config: ExportConfig, model: onnx.ModelProto, examples: dict | None) -> list[dict[str, np.ndarray]]:
    specs = input_specs(model)
    if config.sample_inputs is not None:
        return sample_feeds(config.sample_inputs, specs)
    arrays = {k: v.detach().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in (examples or {}).items()}
    return parity_feeds(specs, examples=arrays, input_shapes=config.input_shapes)


def _reference(source: SourceModel, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    if source.kind is SourceKind.KERAS:
        from onnxforge.converters.keras_export import run_keras

        return run_keras(source.model, feed)
    from onnxforge.converters.torch_export import ProgramRunner, run_torch

    model = ProgramRunner(source.model) if source.kind is SourceKind.TORCH_EXPORT else source.model
    return run_torch(model, feed)


def _shapes_text(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feed.items())


def _check_parity(
    source: SourceModel, model: onnx.ModelProto | Path, config: ExportConfig, examples
) -> tuple[ParityReport, list[str]]:
    """Run the source framework and onnxruntime on the same feeds. Returns the report and the input shapes run.

    onnxruntime failing on a shape the graph declares valid (a baked-in sequence length) is a
    parity failure, not a crash: the file is kept, unverified.
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    session = CpuTarget().session(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model))
    onnx_outputs = [o.name for o in session.get_outputs()]
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4  # a failing run is reported below in one line, not as an ORT log
    report: ParityReport | None = None
    shapes_run = []
    for feed in _parity_feeds(config, proto, examples):
        try:
            reference = _reference(source, feed)
        except Exception as e:
            raise ExportError(f"the source model failed on parity inputs {_shapes_text(feed)}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from e
        batch = int(next(iter(feed.values())).shape[0]) if feed and next(iter(feed.values())).ndim else 1
        shapes_run.append(_shapes_text(feed))
        try:
            got = session.run(None, feed, run_options)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", reason).split(" Status Message:")[0][:200]
            shapes_run[-1] += f" (onnxruntime failed: {reason})"
            part = ParityReport([OutputParity(n, float("inf"), float("inf"), False) for n in onnx_outputs],
                                config.tolerance, (batch,))
        else:
            if len(reference) != len(got):
                raise ExportError(f"the source model returns {len(reference)} tensors, the ONNX model {len(got)}")
            part = compare_outputs(onnx_outputs, reference, got, config.tolerance, batch)
        report = part if report is None else report.merged(part)
    if report is None:
        raise ExportError("the parity check had no inputs to run")
    return report, shapes_run


def _full_check(model: onnx.ModelProto | Path, what: str) -> None:
    """onnx.checker with full_check (strict shape inference); by path for models past 2 GB."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "validation failed"
        raise ExportError(f"{what} fails the ONNX checker: {first}") from e


def _mark_unverified(proto: onnx.ModelProto, parity: ParityReport) -> None:
    entry = next((p for p in proto.metadata_props if p.key == VERIFIED_KEY), None) or proto.metadata_props.add()
    entry.key = VERIFIED_KEY
    entry.value = "false"
    note = next((p for p in proto.metadata_props if p.key == PARITY_KEY), None) or proto.metadata_props.add()
    note.key = PARITY_KEY
    note.value = parity.summary()


def unverified_note_path(output: str | os.PathLike) -> Path:
    """Where a failed parity check leaves its note: ``<out>.unverified.json`` beside the model."""
    out = Path(output)
    return out.with_name(out.name + ".unverified.json")


def _onnx_input(path: Path, notes: list[str]) -> onnx.ModelProto:
    """An .onnx SOURCE: loaded with its external data, fully checked, shapes inferred, loadable by onnxruntime."""
    proto = load_model(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "validation failed"
        raise InvalidModelError(f"{path}: fails the full ONNX check: {first}") from e
    try:
        proto = infer_shapes(proto, strict_mode=True, data_prop=True)  # past 2 GB too
    except (onnx.shape_inference.InferenceError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "inference failed"
        raise InvalidModelError(f"{path}: shape inference fails: {first}") from e
    if any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.load(str(path), load_external_data=False).graph.initializer
    ):
        notes.append(f"read external data beside {path.name}")
    try:
        CpuTarget().session(proto.SerializeToString() if fits_in_protobuf(proto) else str(path))
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InvalidModelError(f"{path}: onnxruntime cannot load it: {reason}") from e
    return proto


def _traced_shapes(proto: onnx.ModelProto, examples: dict | None) -> dict[str, list[int]]:
    """The example inputs' shapes by graph input, the batch set to 1 where the graph leaves it dynamic."""
    shapes = {}
    for spec in input_specs(proto):
        example = (examples or {}).get(spec.name)
        if example is None or len(example.shape) != len(spec.shape):
            continue
        shape = [int(d) for d in example.shape]
        if shape and not isinstance(spec.shape[0], int):
            shape[0] = 1
        shapes[spec.name] = shape
    return shapes


_DEFAULT_CONFIG = ExportConfig()  # frozen: one shared default, as a default argument would be


def export(
    source: str | os.PathLike,
    output: str | os.PathLike,
    config: ExportConfig = _DEFAULT_CONFIG,
    *,
    timeout: float = SOURCE_TIMEOUT_S,
    in_process: bool = False,
) -> ExportResult:
    """Export SOURCE to ONNX at ``output`` and verify it. See the module docstring.

    Returns an ExportResult (exporter used, why dynamo failed if it did, parity per output, input
    and output names/shapes/dtypes). Raises ExportError/UsageError (exit 2) leaving no file, or
    QualityGateError (exit 4) when parity fails, leaving the file marked unverified.

    A ``file.py:callable`` export runs in a child process given ``timeout`` seconds; its code
    exiting, hanging or being killed is a ModelSourceError (exit 2). ``in_process=True`` runs it
    in this process instead (debugging; tests that patch the exporter).
    """
    out = check_output_path(output, *source_files(source), *paths_in(config))
    if config.task is not None and not Path(source).is_dir():
        raise UsageError(f"{source}: --task {config.task.value} is for a Hugging Face model folder, not this source")
    if is_python_source(source) and not in_process:
        from onnxforge.converters._isolation import export_in_child

        return export_in_child(source, out, config, timeout=timeout)
    src = resolve_source(source, config.task)
    fallback = None
    examples = None
    notes: list[str] = []
    if src.kind is SourceKind.ONNX:
        assert src.path is not None  # resolve_source gives every .onnx source its path
        proto = _onnx_input(src.path, notes)
        exporter = "none (ONNX input)"
    elif src.kind is SourceKind.KERAS:
        from onnxforge.converters.keras_export import export_keras

        proto = export_keras(src.model, config)
        exporter = "keras"
        if config.dynamic_axes or config.input_shapes:
            notes.append(
                "Keras fixes shapes from its Input layers (None = dynamic); --dynamic/--input-shape were not used"
            )
    elif src.kind is SourceKind.TRANSFORMERS:
        from onnxforge.converters.hf_folder import hf_note, plan_hf_export
        from onnxforge.converters.torch_export import export_torch

        assert src.hf is not None  # resolve_source loads every folder it returns
        plan = plan_hf_export(src.hf, config)
        config = plan.config  # the settled inputs drive the parity check too
        proto, exporter, fallback, examples, _ = export_torch(src.model, config, plan.examples,
                                                              output_names=plan.output_names)
        notes.append(hf_note(src.hf, inferred=config.task is None))
        if fallback:
            notes.append(f"dynamo exporter failed ({fallback}); the TorchScript exporter produced this file")
    elif src.kind is SourceKind.TORCH_EXPORT:
        from onnxforge.converters.torch_export import export_program

        proto, exporter, examples, _ = export_program(src.model, config)
    else:
        from onnxforge.converters.torch_export import export_torch

        proto, exporter, fallback, examples, _ = export_torch(src.model, config, src.example_inputs)
        if fallback:
            notes.append(f"dynamo exporter failed ({fallback}); the TorchScript exporter produced this file")
    if config.opset and exporter == "dynamo" and default_opset(proto) != config.opset:
        notes.append(f"asked for opset {config.opset}; the dynamo exporter produces opset {default_opset(proto)}")
    big = not fits_in_protobuf(proto)
    if src.kind is not SourceKind.ONNX and not big:
        _full_check(proto, "the exported model")
    parity = None
    parity_inputs: list[str] = []
    saved = False
    if config.check_parity and src.kind is not SourceKind.ONNX:
        if big:  # past protobuf's limit: check and run it from the saved file and its external data
            save_model(proto, out)
            saved = True
            _full_check(out, "the exported model")
            parity, parity_inputs = _check_parity(src, out, config, examples)
        else:
            parity, parity_inputs = _check_parity(src, proto, config, examples)
    note_path = unverified_note_path(out)
    failed_parity = parity if parity is not None and not parity.ok else None
    failed = failed_parity is not None
    if failed_parity is not None:
        _mark_unverified(proto, failed_parity)
    if not saved or failed:  # an .onnx source past 2 GB was saved nowhere yet (issue 17)
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
        parity_inputs=parity_inputs,
        unverified_note=note_path if failed else None,
        traced_shapes=_traced_shapes(proto, examples),
    )
    if failed_parity is not None:
        atomic_write_text(note_path, json.dumps({"source": str(source), **result.to_json()}, indent=2) + "\n")
        crashed = next((shapes for shapes in parity_inputs if "onnxruntime failed" in shapes), None)
        raise QualityGateError(
            f"export of {source}: {failed_parity.summary()}{f' [{crashed}]' if crashed else ''}; "
            f"the file is kept at {out} but is UNVERIFIED (see {note_path.name})",
            hint=(
                "onnxruntime rejected a size the graph declares dynamic: the exporter baked it in; "
                "try the other --exporter, or drop that --dynamic dim"
                if crashed
                else "inspect the op that drifts, or loosen --atol/--rtol if the error is acceptable"
                + (
                    "; the check ran on random inputs, where a model with large activations can drift"
                    " though real ones do not: check with --sample real.npz"
                    if config.sample_inputs is None
                    else ""
                )
            ),
            best_path=str(out),
        )
    note_path.unlink(missing_ok=True)  # a stale note from an earlier failed export to this path
    return result
