"""The quantize stage: calibrate once, quantize and score each candidate scheme, time them on the
target, keep the fastest within tolerance (the package docstring gives the whole procedure).

Each step is a module beside this one: calibrate (samples, pre-processing, ranges), graphs (the
fp32 graphs candidates start from: fused, residual sums), backends (one onnxruntime call per
candidate), select (scoring, timing, mixed precision, the choice).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import onnx

from onnxforge._atomic import atomic_write_bytes, check_output_path, paths_in
from onnxforge.errors import QualityGateError, UsageError
from onnxforge.model_io import model_file_size, save_model
from onnxforge.pipeline.cache import StageCache
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.gate_rules import loosen_hint
from onnxforge.pipeline.normalize import load_stage_input, quantized_ops
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.pipeline.quantize.calibrate import data_notes, load_calibration
from onnxforge.pipeline.quantize.config import INPUT_KEPT, CandidateResult, Objective, QuantizeConfig, QuantizeResult
from onnxforge.pipeline.quantize.embeddings import embedding_tables
from onnxforge.pipeline.quantize.graphs import prepare_graphs
from onnxforge.pipeline.quantize.opset import opset_for_schemes
from onnxforge.pipeline.quantize.select import _LATENCY_TIE_FRACTION, REWRITTEN_FP32, CandidateRun
from onnxforge.pipeline.quantize.smooth_quant import smooth_groups
from onnxforge.targets import QuantMethod, QuantScheme, get_target

__all__ = ["quantize"]

_DEFAULT_CONFIG = QuantizeConfig()  # frozen: one shared default is safe


def _nothing_quantized(model: onnx.ModelProto) -> str:
    """Why a kept model holds no int8 op: usually its layers are inside If/Loop bodies (silero-vad)."""
    top = {n.op_type for n in model.graph.node}
    nested = sum(1 for n in model.graph.node for a in n.attribute if a.type in (onnx.AttributeProto.GRAPH,
                                                                                 onnx.AttributeProto.GRAPHS))
    reason = (f"its Conv/MatMul/Gemm nodes are inside {nested} If/Loop/Scan bodies, which onnxruntime's static "
              "quantizer does not enter") if nested and not top & {"Conv", "MatMul", "Gemm"} else (
              "no op of it is one onnxruntime quantizes")
    return f"nothing was quantized: {reason}; the kept model computes in float like the input"


def quantize(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: object,
    config: QuantizeConfig = _DEFAULT_CONFIG,
    *,
    cache: StageCache | None = None,
    progress: Progress = ignore,
) -> QuantizeResult:
    """Quantize ``input_path`` with ``calibration`` data and write the chosen model to ``output``.

    ``cache``: where the candidates' timings are recorded, so that a re-run with the same candidates
    reuses them and keeps the same scheme (timing_record); None times every run. ``progress`` hears
    each phase: calibration batches, each candidate scored k/K, the timing rounds.

    ``calibration``: a DataSpec (how every stage names its data), an .npz path, a folder of .npz/.npy
    or of images, an ImageFolder (declared preprocessing), a SampleSet, or any iterable of samples
    (see onnxforge.pipeline.calibration).
    Measured: each candidate's score on held-out samples vs fp32, p50 latency interleaved with
    fp32 on the target, size; for mixed precision every step's score; per-node SQNR.
    """
    calibration_path = calibration.path if isinstance(calibration, DataSpec) else (
        calibration if isinstance(calibration, (str, os.PathLike)) else None)
    out = check_output_path(output, input_path, calibration_path, *paths_in(config))
    target = get_target(config.target)
    target.require()
    # an int8 model quantized again ended in "KeyError: '140_scale' ... Graph is not a DAG": refused here
    loaded = load_stage_input(input_path, "quantize")
    model = loaded.model
    loaded.session(target)  # must load on the target: else calibration fails first and its error blames the data
    step(progress, "reading the calibration data")
    data = load_calibration(model, calibration, config)
    schemes = list(config.schemes or target.quant_candidates(model))
    if not schemes:
        raise UsageError(f"target {target.name!r} proposes no quantization scheme")
    notes: list[str] = list(loaded.notes)
    model, schemes, opset_notes = opset_for_schemes(model, schemes, data.calib.first_batch(1))
    notes += opset_notes
    schemes = _fit_schemes(schemes, model, config, notes)
    notes += data_notes(calibration, config, data)

    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp_dir:
        tmp = Path(tmp_dir)
        step(progress, "preparing the fp32 graphs")
        graphs = prepare_graphs(model, tmp, config, target, data, notes, schemes)
        step(progress, "running fp32 on the held-out samples")
        run = CandidateRun(tmp, graphs, config, target, data)
        run.records = cache
        run.progress = progress
        run.measure(schemes)
        search = run.mixed_precision(notes)
        chosen, passed = run.choose()
        input_bytes = model_file_size(input_path)
        kept_input = passed and not run.improves(chosen, input_bytes)
        if not kept_input:
            step(progress, "measuring the kept model's per-node error")
        layer_errors = [] if kept_input else run.layer_errors(chosen, notes)
        notes += run.notes
        coarse = run.coarse_note()
        if coarse:
            notes.append(coarse)
        if run.timings_reused:
            notes.append("latencies as recorded by an earlier run of these same candidates on this machine (the "
                         "stage cache), so the same scheme is kept; --no-cache times them again")
        if data.plan is not None and (data.plan.explicit or data.plan.reduced):
            notes.append(data.plan.describe())
        if REWRITTEN_FP32 in run.timings:
            speedup = run.timings["fp32"].p50_ms / run.timings[REWRITTEN_FP32].p50_ms
            notes.append(f"the rewritten fp32 graph alone runs {speedup:.2f}x the input model (part of each speedup)")
        best_model = onnx.load(str(run.paths[chosen.scheme]), load_external_data=True)
        if not quantized_ops(best_model.graph):  # also why a kept input was not beaten (silero's If bodies)
            notes.append(_nothing_quantized(model))
        if kept_input:
            _keep_input(Path(input_path), out, input_bytes)
        else:
            save_model(best_model, out)
        calibration_batches = run.calibration_batches

    if not kept_input and chosen.speedup is not None and chosen.speedup < 1.0:
        notes.append(
            f"the kept model is {1 / chosen.speedup:.2f}x SLOWER than fp32 on target {target.name!r}: " + (
                "it is the smallest within tolerance (--objective size)" if passed else
                "no candidate is faster; this model's time is not in ops that int8 kernels speed up")
        )
    result = QuantizeResult(
        path=out,
        chosen=INPUT_KEPT if kept_input else chosen.scheme,
        gate=run.gate,
        fp32_score=run.fp32_score,
        fp32_latency=run.timings["fp32"],
        candidates=run.candidates,
        calibration_samples=len(data.calib),
        eval_samples=len(data.held_out),
        notes=notes,
        mixed_precision=search,
        layer_errors=layer_errors,
        calibration_batches=calibration_batches,
        objective=config.objective.value,
        kept_input=kept_input,
        op_classes=run.op_classes,
    )
    if kept_input:
        raise QualityGateError(_no_improvement(config.objective, chosen, target.name, input_bytes, out),
                               hint=_NO_IMPROVEMENT_HINT[config.objective], best_path=str(out),
                               result=result.to_json())
    if not passed:
        raise QualityGateError(
            f"no quantized model meets the tolerance ({run.gate.describe()}): the best, {chosen.scheme}, scores "
            f"{run.gate.format(chosen.score) if chosen.score is not None else 'no score'} vs fp32 "
            f"{run.gate.format(run.fp32_score)}" + (f" ({chosen.gate_checks})" if chosen.gate_checks else "")
            + f"; it is saved at {out}",
            hint=loosen_hint(run.gate, chosen.gate_checks or "") + ", add calibration data, or keep sensitive ops "
            "in float with --exclude-op",
            best_path=str(out),
            result=result.to_json(),
        )
    return result


_NO_IMPROVEMENT_HINT = {
    Objective.LATENCY: "this model's time is not in ops that int8 kernels speed up (a small model is bound by "
    "per-op overhead); keep the input, try another --target, or use --objective size to keep the smallest",
    Objective.SIZE: "no scheme stores this model's weights in fewer bytes; keep the input",
}


def _no_improvement(objective: Objective, best: CandidateResult, target: str, input_bytes: int, out: Path) -> str:
    """The gate's message when no candidate within tolerance improves on the input."""
    if objective is Objective.SIZE:
        measured = f"{best.bytes:,} bytes vs the input's {input_bytes:,}"
        return (f"no quantized candidate is smaller than the input (best: {best.scheme} at {measured}); "
                f"the input is kept at {out}")
    speed = f"{best.speedup:.2f}x" if best.speedup is not None else "not timed"
    if best.speedup is not None and best.speedup >= 1.0:
        speed += f", inside the {_LATENCY_TIE_FRACTION:.0%} timing noise where the input's quality wins"
    return (f"no quantized candidate is faster than the input on {target} (best: {best.scheme} at {speed}); "
            f"the input is kept at {out}")


def _keep_input(input_path: Path, out: Path, input_bytes: int) -> None:
    """Write the input model to ``out`` unchanged: its bytes when it is one file, else re-saved with its data."""
    if input_bytes == input_path.stat().st_size:
        atomic_write_bytes(out, input_path.read_bytes())
    else:
        save_model(onnx.load(str(input_path), load_external_data=True), out)


def _fit_schemes(
    schemes: list[QuantScheme], model: onnx.ModelProto, config: QuantizeConfig, notes: list[str]
) -> list[QuantScheme]:
    """``schemes`` with int8 embedding tables where ``quantize_embeddings`` asks and the model has one,
    and without smoothing where no normalization feeds a MatMul (it would measure the same model twice)."""
    if any(s.smooth for s in schemes) and not smooth_groups(model):
        schemes = [dataclasses.replace(s, smooth=False) for s in schemes]
    tables = embedding_tables(model) if config.quantize_embeddings else []
    if tables:
        notes.append(
            f"embedding table(s) {', '.join(tables)} stored in int8 with per-row scales in every int8/int4 "
            "candidate (quantize_embeddings)"
        )
        schemes = [s if s.method is QuantMethod.FP16 else dataclasses.replace(s, int8_embeddings=True) for s in schemes]
    return list(dict.fromkeys(schemes))
