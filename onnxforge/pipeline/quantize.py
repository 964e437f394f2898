"""Static INT8 quantization that measures what is fast on the target and keeps accuracy.

Procedure: (1) pre-process the fp32 model (``quant_pre_process``: optimization + shape
inference, which ``quantize_static`` needs to quantize activations at all); (2) calibrate once
on the user's samples and cache the ranges; (3) quantize once per candidate scheme the target
proposes (format, activation type, per-channel or not); (4) score each candidate on held-out
samples against fp32 (and labels); (5) time fp32 and all candidates interleaved on the target;
(6) keep the fastest candidate that meets the tolerance. Every candidate's numbers are returned.

No candidate within tolerance: the most accurate one is saved and QualityGateError (exit 4) is
raised. A kept candidate that is not faster than fp32 is saved with a note saying so.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnxruntime import quantization as ortq

from onnxforge._atomic import check_output_path
from onnxforge.errors import CalibrationDataError, QualityGateError, UsageError
from onnxforge.model_io import input_specs, load_model, output_specs, save_model
from onnxforge.pipeline.calibration import CalibrationReader, SampleSet, load_samples, model_batch_size
from onnxforge.pipeline.evaluate import Metric, QualityGate, run_outputs, score
from onnxforge.targets import ActivationType, QuantFormat, QuantScheme, get_target
from onnxforge.targets.feeds import batch_from_samples
from onnxforge.targets.latency import LatencyStats, compare_latency

__all__ = ["CalibrationMethod", "QuantizeConfig", "QuantizeResult", "CandidateResult", "quantize"]

_log = logging.getLogger(__name__)


class CalibrationMethod(enum.Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    DISTRIBUTION = "distribution"

    def to_ort(self) -> ortq.CalibrationMethod:
        return {
            CalibrationMethod.MINMAX: ortq.CalibrationMethod.MinMax,
            CalibrationMethod.ENTROPY: ortq.CalibrationMethod.Entropy,
            CalibrationMethod.PERCENTILE: ortq.CalibrationMethod.Percentile,
            CalibrationMethod.DISTRIBUTION: ortq.CalibrationMethod.Distribution,
        }[self]


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """How to quantize.

    schemes: the candidates to measure; None lets the target propose them.
    metric / tolerance: the quality gate (see onnxforge.pipeline.evaluate); tolerance None = metric default.
    eval_data: held-out samples (with ``label`` for accuracy); None holds out the last
      ``holdout_fraction`` of the calibration samples instead.
    threads: intra-op threads for the latency measurement (1 is the most stable on a shared host).
    """

    target: str = "cpu"
    schemes: tuple[QuantScheme, ...] | None = None
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    max_calibration_samples: int = 256
    metric: Metric = Metric.AUTO
    tolerance: float | None = None
    eval_data: Path | None = None
    holdout_fraction: float = 0.2
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    threads: int = 1
    latency_rounds: int = 20

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "schemes": [s.label for s in self.schemes] if self.schemes else None,
            "calibration_method": self.calibration_method.value,
            "max_calibration_samples": self.max_calibration_samples,
            "metric": self.metric.value,
            "tolerance": self.tolerance,
            "eval_data": str(self.eval_data) if self.eval_data else None,
            "holdout_fraction": self.holdout_fraction,
            "exclude_nodes": list(self.exclude_nodes),
            "exclude_op_types": list(self.exclude_op_types),
            "threads": self.threads,
        }


@dataclass
class CandidateResult:
    scheme: str
    score: float | None = None
    meets_tolerance: bool = False
    latency: LatencyStats | None = None
    speedup: float | None = None
    bytes: int | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return {
            "scheme": self.scheme,
            "score": self.score,
            "meets_tolerance": self.meets_tolerance,
            "latency": self.latency.to_json() if self.latency else None,
            "speedup_vs_fp32": self.speedup,
            "bytes": self.bytes,
            "error": self.error,
        }


@dataclass
class QuantizeResult:
    path: Path
    chosen: str
    gate: QualityGate
    fp32_score: float
    fp32_latency: LatencyStats
    candidates: list[CandidateResult]
    calibration_samples: int
    eval_samples: int
    notes: list[str] = field(default_factory=list)

    @property
    def chosen_candidate(self) -> CandidateResult:
        return next(c for c in self.candidates if c.scheme == self.chosen)

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "chosen": self.chosen,
            "metric": self.gate.metric.value,
            "tolerance": self.gate.tolerance,
            "gate": self.gate.describe(),
            "fp32_score": self.fp32_score,
            "fp32_latency": self.fp32_latency.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
            "calibration_samples": self.calibration_samples,
            "eval_samples": self.eval_samples,
            "notes": self.notes,
        }


def _preprocess(model: onnx.ModelProto, folder: Path, notes: list[str]) -> Path:
    """quant_pre_process with the fallbacks dynamo/TorchScript exports need; returns the model path."""
    src = folder / "fp32.onnx"
    onnx.save_model(model, str(src))
    out = folder / "fp32_pre.onnx"
    attempts = [
        ("symbolic shape inference", {}),
        ("symbolic shape inference with auto-merge", {"auto_merge": True}),
        ("ONNX shape inference only", {"skip_symbolic_shape": True}),
    ]
    errors = []
    for label, kwargs in attempts:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ortq.quant_pre_process(str(src), str(out), **kwargs)
            if errors:
                notes.append(f"pre-processing used {label} ({errors[-1]})")
            return out
        except Exception as e:
            errors.append(f"{label} failed: {type(e).__name__}")
    notes.append("quant_pre_process failed (" + "; ".join(errors) + "); quantizing the model as given")
    return src


def _quantize_one(
    source: Path, dest: Path, scheme: QuantScheme, reader: CalibrationReader, config: QuantizeConfig, cache: Path
) -> None:
    act = ortq.QuantType.QUInt8 if scheme.activations is ActivationType.UINT8 else ortq.QuantType.QInt8
    reader.rewind()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ortq.quantize_static(
            str(source),
            str(dest),
            calibration_data_reader=reader,
            quant_format=ortq.QuantFormat.QDQ if scheme.format is QuantFormat.QDQ else ortq.QuantFormat.QOperator,
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range,
            activation_type=act,
            weight_type=ortq.QuantType.QInt8,
            nodes_to_exclude=list(config.exclude_nodes) or None,
            op_types_to_quantize=_op_types(source, config.exclude_op_types),
            calibrate_method=config.calibration_method.to_ort(),
            calibration_cache_path=str(cache),
            extra_options={"CalibMovingAverage": False},
        )


def _op_types(model_path: Path, excluded: Sequence[str]) -> list[str] | None:
    if not excluded:
        return None
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = onnx.load(str(model_path), load_external_data=False)
    present = {n.op_type for n in model.graph.node}
    quantizable = (set(QLinearOpsRegistry) | set(QDQRegistry)) & present
    return sorted(quantizable - set(excluded))


def _load_eval(config: QuantizeConfig, model: onnx.ModelProto, calibration: SampleSet) -> tuple[SampleSet, SampleSet]:
    if config.eval_data is not None:
        held_out = load_samples(config.eval_data, input_specs(model))
        return calibration, held_out
    if len(calibration) < 2:
        raise CalibrationDataError(
            f"{calibration.source}: {len(calibration)} sample(s): too few to both calibrate and check accuracy",
            hint="give at least 10 samples, or a separate --eval file",
        )
    return calibration.split(config.holdout_fraction)


def quantize(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: str | os.PathLike | SampleSet,
    config: QuantizeConfig = QuantizeConfig(),
) -> QuantizeResult:
    """Quantize ``input_path`` with ``calibration`` data and write the chosen model to ``output``."""
    out = check_output_path(output, input_path)
    target = get_target(config.target)
    target.require()
    model = load_model(input_path)
    specs = input_specs(model)
    samples = calibration if isinstance(calibration, SampleSet) else load_samples(calibration, specs)
    calib, held_out = _load_eval(config, model, samples)
    if len(calib) > config.max_calibration_samples:
        calib = calib.take(slice(0, config.max_calibration_samples))
    batch = model_batch_size(specs, preferred=min(16, len(calib)))
    schemes = list(config.schemes or target.quant_candidates())
    if not schemes:
        raise UsageError(f"target {target.name!r} proposes no quantization scheme")
    notes: list[str] = []
    if config.eval_data is None:
        notes.append(
            f"no --eval data: quality measured on the last {len(held_out)} calibration samples, held out of calibration"
        )

    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp_dir:
        tmp = Path(tmp_dir)
        fp32_path = _preprocess(model, tmp, notes)
        reader = CalibrationReader(calib, batch)
        cache = tmp / f"calibration_{config.calibration_method.value}.json"
        eval_batch = model_batch_size(specs, preferred=32)
        fp32_session = target.session(fp32_path, threads=config.threads)
        reference = run_outputs(fp32_session, held_out, eval_batch)
        gate = QualityGate.resolve(
            config.metric, config.tolerance, held_out.labels is not None, tuple(reference[0].shape)
        )
        if gate.metric is Metric.ACCURACY and held_out.labels is None:
            raise CalibrationDataError(f"{held_out.source}: accuracy needs a 'label' array", hint="or use --metric agreement")
        fp32_score = score(gate.metric, reference, reference, held_out.labels)

        candidates: list[CandidateResult] = []
        paths: dict[str, Path] = {}
        for index, scheme in enumerate(schemes):
            result = CandidateResult(scheme.label)
            candidates.append(result)
            dest = tmp / f"candidate_{index}.onnx"
            start = time.perf_counter()
            try:
                _quantize_one(fp32_path, dest, scheme, reader, config, cache)
                session = target.session(dest, threads=config.threads)
                outputs = run_outputs(session, held_out, eval_batch)
            except Exception as e:  # one failing scheme must not sink the others
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                result.error = f"{type(e).__name__}: {first}"
                continue
            _log.debug("quantized %s in %.1fs", scheme.label, time.perf_counter() - start)
            result.score = score(gate.metric, outputs, reference, held_out.labels)
            result.meets_tolerance = gate.passes(result.score, fp32_score)
            result.bytes = dest.stat().st_size
            paths[scheme.label] = dest

        if not paths:
            raise QualityGateError(
                "every quantization scheme failed: " + "; ".join(f"{c.scheme}: {c.error}" for c in candidates),
                hint="try --exclude-op on the op named above",
            )
        sessions = {"fp32": fp32_session} | {
            label: target.session(path, threads=config.threads) for label, path in paths.items()
        }
        feeds = batch_from_samples(held_out.inputs, model_batch_size(specs, preferred=1))
        timings = compare_latency(sessions, feeds, rounds=config.latency_rounds)
        for c in candidates:
            if c.scheme in timings:
                c.latency = timings[c.scheme]
                c.speedup = timings["fp32"].p50_ms / c.latency.p50_ms

        passing = [c for c in candidates if c.meets_tolerance and c.latency is not None]
        if passing:
            chosen = min(passing, key=lambda c: c.latency.p50_ms)
        else:
            measured = [c for c in candidates if c.score is not None]
            chosen = max(measured, key=lambda c: c.score if gate.higher_is_better else -c.score)
        save_model(onnx.load(str(paths[chosen.scheme]), load_external_data=True), out)

    result = QuantizeResult(
        path=out,
        chosen=chosen.scheme,
        gate=gate,
        fp32_score=fp32_score,
        fp32_latency=timings["fp32"],
        candidates=candidates,
        calibration_samples=len(calib),
        eval_samples=len(held_out),
        notes=notes,
    )
    if not passing:
        raise QualityGateError(
            f"no quantized model meets the tolerance ({gate.describe()}): the best, {chosen.scheme}, scores "
            f"{gate.format(chosen.score)} vs fp32 {gate.format(fp32_score)}; it is saved at {out}",
            hint="loosen --tolerance, add calibration data, or keep sensitive ops in float with --exclude-op",
            best_path=str(out),
        )
    if chosen.speedup is not None and chosen.speedup < 1.0:
        notes.append(
            f"no quantized candidate is faster than fp32 on target {target.name!r} "
            f"(best {chosen.speedup:.2f}x): this model's time is not in ops that int8 kernels speed up"
        )
    return result
