"""Static INT8 quantization that measures what is fast on the target and keeps accuracy.

Procedure: (1) pre-process the fp32 model (``quant_pre_process``: optimization + shape
inference, which ``quantize_static`` needs to quantize activations at all); (2) calibrate once
on the user's samples and cache the ranges; (3) quantize once per candidate scheme the target
proposes (format, activation type, per-channel or not); (4) score each candidate on held-out
samples against fp32 (and labels); (5) time fp32 and all candidates interleaved on the target;
(6) keep the fastest candidate that meets the tolerance. Every candidate's numbers are returned.

Calibration runs once, one batch at a time (onnxforge.pipeline.calibration_ranges): bounded
memory, and Entropy/Percentile/Distribution accept variable-length samples. When the fastest
candidate misses the tolerance, mixed precision (onnxforge.pipeline.mixed_precision) returns
its most sensitive nodes to float until it holds, and everything is timed again. The kept
model's per-node error (local and end-to-end SQNR vs fp32, onnxforge.pipeline.quant_error) is
measured on calibration samples and returned as ``layer_errors``.

Candidates need not be static: a target may propose dynamic int8 (``quantize_dynamic``: int8
MatMul weights, activation ranges computed per run; the CPU proposes it for MatMul-dominated
models such as transformers) or fp16 (GPU targets); they are scored and timed like the others.
Transformers first get onnxruntime.transformers fusions (onnxforge.pipeline.transformer_fusion),
kept only when something fused, with a note either way.

No candidate within tolerance: the most accurate one is saved and QualityGateError (exit 4) is
raised. A kept candidate that is not faster than fp32 is saved with a note saying so.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnxruntime import quantization as ortq

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.errors import CalibrationDataError, OnnxForgeError, QualityGateError, RecipeError, UsageError
from onnxforge.model_io import input_specs, load_model, save_model
from onnxforge.pipeline import codec
from onnxforge.pipeline.calibration import (
    CalibrationReader,
    ImageFolder,
    SampleSet,
    StreamedSamples,
    load_samples,
    model_batch_size,
    open_calibration,
)
from onnxforge.pipeline.calibration_ranges import collect_ranges
from onnxforge.pipeline.evaluate import Metric, QualityGate, run_outputs, score
from onnxforge.pipeline.mixed_precision import MixedPrecisionSearch, node_groups, rank_nodes, search_float_nodes
from onnxforge.pipeline.quant_error import NodeError, measure_node_errors
from onnxforge.pipeline.transformer_fusion import fuse_transformer, looks_like_transformer
from onnxforge.targets import ActivationType, QuantFormat, QuantMethod, QuantScheme, get_target
from onnxforge.targets.feeds import batch_from_samples
from onnxforge.targets.latency import LatencyStats, compare_latency

__all__ = [
    "CalibrationMethod",
    "QuantizeConfig",
    "QuantizeResult",
    "CandidateResult",
    "quantize",
    "parse_scheme",
    "scheme_id",
]

_log = logging.getLogger(__name__)

# Determinism (issue 7, reliability): p50s move ~±15% run to run, and on small models the candidates
# are within a few percent of each other, so "the minimum p50" picked a different scheme on each run
# of the same recipe (3 runs, 3 choices, measured). Candidates within this fraction of the fastest
# count as tied, and the earliest in the target's order (the list order) wins.
_LATENCY_TIE_FRACTION = 0.05


def _fastest(candidates: list) -> CandidateResult:
    best = min(c.latency.p50_ms for c in candidates)
    return next(c for c in candidates if c.latency.p50_ms <= best * (1.0 + _LATENCY_TIE_FRACTION))


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


_SCHEME_ID = re.compile(
    r"^(?P<format>qdq|qoperator)-(?P<act>u8|s8)s8-(?P<gran>per-channel|per-tensor)(?P<reduce>-reduce-range)?$"
)
_DYNAMIC_ID = re.compile(r"^dynamic-s8-(?P<gran>per-channel|per-tensor)(?P<reduce>-reduce-range)?$")
# quantize_dynamic's integer kernels: MatMulInteger/DynamicQuantizeMatMul, QAttention, DynamicQuantizeLSTM.
# Conv is left out on purpose (ConvInteger ran 0.2-0.3x fp32 on this CPU); Gather (embeddings) too.
_DYNAMIC_OP_TYPES = ("MatMul", "Attention", "LSTM")


def scheme_id(scheme: QuantScheme) -> str:
    """The scheme as the CLI spells it, e.g. ``qdq-u8s8-per-channel``, ``dynamic-s8-per-channel``, ``fp16``:
    its label (``QDQ U8S8 per-channel``) in lower case with dashes, so the two can never disagree."""
    return scheme.label.lower().replace(" ", "-")


def parse_scheme(text: str) -> QuantScheme:
    """``FORMAT-ACTsWEIGHTS-GRANULARITY[-reduce-range]``, e.g. ``qdq-u8s8-per-channel`` (weights are int8)."""
    text = text.strip().lower()
    if text == "fp16":
        return QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.INT8, method=QuantMethod.FP16)
    dynamic = _DYNAMIC_ID.match(text)
    if dynamic:
        return QuantScheme(format=QuantFormat.QOPERATOR, activations=ActivationType.UINT8,
                           per_channel=dynamic["gran"] == "per-channel", reduce_range=bool(dynamic["reduce"]),
                           method=QuantMethod.DYNAMIC)
    match = _SCHEME_ID.match(text)
    if not match:
        raise UsageError(
            f"unknown quantization scheme {text!r}",
            hint="e.g. qdq-u8s8-per-channel, qdq-s8s8-per-tensor, qoperator-u8s8-per-channel-reduce-range, "
            "dynamic-s8-per-channel, fp16",
        )
    return QuantScheme(
        format=QuantFormat(match["format"]),
        activations=ActivationType.UINT8 if match["act"] == "u8" else ActivationType.INT8,
        per_channel=match["gran"] == "per-channel",
        reduce_range=bool(match["reduce"]),
    )


def _decode_scheme(value: object, where: str, base: object) -> QuantScheme:
    if not isinstance(value, str):
        raise RecipeError(f"{where}: expected a scheme name such as qdq-u8s8-per-channel, got {value!r}")
    try:
        return parse_scheme(value)
    except OnnxForgeError as e:
        raise RecipeError(f"{where}: {e.message}", hint=e.hint) from e


codec.register_type(QuantScheme, scheme_id, _decode_scheme)


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """How to quantize.

    schemes: the candidates to measure; None lets the target propose them.
    metric / tolerance: the quality gate (see onnxforge.pipeline.evaluate); tolerance None = metric default.
    eval_data: held-out samples (with ``label`` for accuracy); None holds out the last
      ``holdout_fraction`` of the calibration samples instead.
    threads: intra-op threads for the latency measurement (1 is the most stable on a shared host).
    activation_symmetric / weight_symmetric: symmetric ranges (zero point at the type's middle).
    mixed_precision: when the fastest candidate misses the tolerance, return its most sensitive
      nodes to float until it holds, trying at most ``mixed_precision_steps`` quantizations and
      at most ``max_float_fraction`` of the quantized nodes.
    error_report: measure each quantized node's SQNR vs fp32 on ``analysis_samples`` calibration
      samples (also the samples mixed precision ranks nodes on).
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
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    mixed_precision: bool = True
    max_float_fraction: float = 0.5
    mixed_precision_steps: int = 10
    error_report: bool = True
    analysis_samples: int = 32
    # bytes; refuse before loading data when calibration would need more. Not in the cache key: it decides
    # whether the stage runs, not what it writes.
    max_memory: int | None = field(default=None, metadata={"key": False})
    transformer_fusion: bool = True  # onnxruntime.transformers fusions first, kept only when they fuse something

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise UsageError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.max_float_fraction <= 1.0:
            raise UsageError(f"max_float_fraction must be in (0, 1], got {self.max_float_fraction}")
        if self.max_calibration_samples < 1 or self.analysis_samples < 1:
            raise UsageError("max_calibration_samples and analysis_samples must be at least 1")



@dataclass
class CandidateResult:
    scheme: str
    score: float | None = None
    meets_tolerance: bool = False
    latency: LatencyStats | None = None
    speedup: float | None = None
    bytes: int | None = None
    error: str | None = None
    float_nodes: list[str] = field(default_factory=list)  # nodes kept in float by mixed precision

    def to_json(self) -> dict:
        return {
            "scheme": self.scheme,
            "float_nodes": self.float_nodes,
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
    mixed_precision: MixedPrecisionSearch | None = None
    layer_errors: list[NodeError] = field(default_factory=list)  # the kept model's nodes, graph order
    calibration_batches: int = 0

    def top_offenders(self, count: int = 5) -> list[NodeError]:
        """The kept model's nodes with the lowest local SQNR (the error their own quantization adds)."""
        return rank_nodes(self.layer_errors)[:count]

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
            "calibration_batches": self.calibration_batches,
            "mixed_precision": self.mixed_precision.to_json() if self.mixed_precision else None,
            "layer_errors": [e.to_json() for e in self.layer_errors],
            "top_offenders": [e.node for e in self.top_offenders()],
        }


def _preprocess(model: onnx.ModelProto, folder: Path, notes: list[str]) -> Path:
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
    _name_nodes(chosen)
    return chosen


def _name_nodes(path: Path) -> None:
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


def _quantize_one(
    source: Path,
    dest: Path,
    scheme: QuantScheme,
    config: QuantizeConfig,
    cache: Path,
    float_nodes: Sequence[str] = (),
) -> None:
    """quantize_static with the cached calibration ranges (never calibrates again); dynamic int8
    (quantize_dynamic, no ranges needed) or an fp16 cast for the schemes that ask for those."""
    excluded = list(dict.fromkeys([*config.exclude_nodes, *float_nodes]))
    if scheme.method is QuantMethod.FP16:
        from onnxforge.pipeline.fp16 import Fp16Config, to_fp16_model

        blocked = tuple(config.exclude_op_types)
        half = to_fp16_model(onnx.load(str(source)), Fp16Config(op_block_list=blocked) if blocked else Fp16Config())
        onnx.save_model(half, str(dest))
        return
    if scheme.method is QuantMethod.DYNAMIC:
        op_types = [t for t in _DYNAMIC_OP_TYPES if t not in config.exclude_op_types]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ortq.quantize_dynamic(
                str(source),
                str(dest),
                per_channel=scheme.per_channel,
                reduce_range=scheme.reduce_range,
                weight_type=ortq.QuantType.QInt8,
                op_types_to_quantize=op_types,
                nodes_to_exclude=excluded or None,
                extra_options={"WeightSymmetric": config.weight_symmetric},
            )
        return
    act = ortq.QuantType.QUInt8 if scheme.activations is ActivationType.UINT8 else ortq.QuantType.QInt8
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ortq.quantize_static(
            str(source),
            str(dest),
            calibration_data_reader=None,
            quant_format=ortq.QuantFormat.QDQ if scheme.format is QuantFormat.QDQ else ortq.QuantFormat.QOperator,
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range,
            activation_type=act,
            weight_type=ortq.QuantType.QInt8,
            nodes_to_exclude=excluded or None,
            op_types_to_quantize=_op_types(source, config.exclude_op_types),
            calibrate_method=config.calibration_method.to_ort(),
            calibration_cache_path=str(cache),
            extra_options={
                "CalibMovingAverage": False,
                "ActivationSymmetric": config.activation_symmetric,
                "WeightSymmetric": config.weight_symmetric,
            },
        )


def _op_types(model_path: Path, excluded: Sequence[str]) -> list[str] | None:
    if not excluded:
        return None
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = onnx.load(str(model_path), load_external_data=False)
    present = {n.op_type for n in model.graph.node}
    quantizable = (set(QLinearOpsRegistry) | set(QDQRegistry)) & present
    return sorted(quantizable - set(excluded))


def _load_eval(
    config: QuantizeConfig, model: onnx.ModelProto, calibration: SampleSet | StreamedSamples
) -> tuple[SampleSet | StreamedSamples, SampleSet]:
    """(calibration part, held-out samples in memory)."""
    if config.eval_data is not None:
        held_out = load_samples(config.eval_data, input_specs(model), allow_ragged=True)
        return calibration, held_out
    if len(calibration) < 2:
        raise CalibrationDataError(
            f"{calibration.source}: {len(calibration)} sample(s): too few to both calibrate and check accuracy",
            hint="give at least 10 samples, or a separate --eval file",
        )
    calib, held_out = calibration.split(config.holdout_fraction)
    return calib, held_out.materialize()


def _error_line(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def _latency_feeds(held_out: SampleSet, batch: int) -> dict:
    if not held_out.is_ragged:
        return batch_from_samples(held_out.inputs, batch)
    first = next(held_out.batches(batch))
    return batch_from_samples(first, batch)


class _Run:
    """State shared by the steps of one quantize() call (paths in a temporary folder)."""

    def __init__(self, tmp: Path, fp32_path: Path, cache: Path, config: QuantizeConfig, target, held_out: SampleSet,
                 eval_batch: int, gate: QualityGate, reference: list, fp32_score: float) -> None:
        self.tmp = tmp
        self.fp32_path = fp32_path
        self.cache = cache
        self.config = config
        self.target = target
        self.held_out = held_out
        self.eval_batch = eval_batch
        self.gate = gate
        self.reference = reference
        self.fp32_score = fp32_score
        self._count = 0

    def quantize(self, scheme: QuantScheme, float_nodes: Sequence[str] = ()) -> Path:
        self._count += 1
        dest = self.tmp / f"candidate_{self._count}.onnx"
        _quantize_one(self.fp32_path, dest, scheme, self.config, self.cache, float_nodes)
        return dest

    def score(self, path: Path) -> float:
        session = self.target.session(path, threads=self.config.threads)
        outputs = run_outputs(session, self.held_out, self.eval_batch)
        return score(self.gate.metric, outputs, self.reference, self.held_out.labels)


def _analysis_batches(calib: SampleSet | StreamedSamples, count: int, batch: int, fixed: bool) -> Iterator[dict]:
    subset = calib.take(slice(0, min(count, len(calib))))
    reader = CalibrationReader(subset, batch, fixed_batch=fixed)
    return iter(reader.get_next, None)


def _qdq_twin(scheme: QuantScheme) -> QuantScheme:
    return QuantScheme(
        format=QuantFormat.QDQ,
        activations=scheme.activations,
        per_channel=scheme.per_channel,
        reduce_range=scheme.reduce_range,
    )


def quantize(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration: object,
    config: QuantizeConfig = QuantizeConfig(),
) -> QuantizeResult:
    """Quantize ``input_path`` with ``calibration`` data and write the chosen model to ``output``.

    ``calibration``: an .npz path, a folder of .npz/.npy or of images, an ImageFolder (declared
    preprocessing), a SampleSet, or any iterable of samples (see onnxforge.pipeline.calibration).
    Measured: each candidate's score on held-out samples vs fp32, p50 latency interleaved with
    fp32 on the target, size; for mixed precision every step's score; per-node SQNR.
    """
    calibration_path = None if isinstance(calibration, SampleSet) or not isinstance(calibration, (str, os.PathLike)) else calibration
    out = check_output_path(output, input_path, calibration_path, *paths_in(config))
    target = get_target(config.target)
    target.require()
    model = load_model(input_path)
    target.session(input_path)  # must load on the target: else calibration fails first and its error blames the data
    specs = input_specs(model)
    wanted = config.max_calibration_samples
    if config.eval_data is None:
        wanted = math.ceil(wanted / (1.0 - config.holdout_fraction)) + 1
    if config.max_memory is not None:  # a clear error before loading, not the OOM killer during calibration
        from onnxforge.pipeline.calibration_memory import guard_calibration_memory

        guard_calibration_memory(model, specs, calibration, config.max_memory, config.max_calibration_samples)
    source = open_calibration(calibration, specs, limit=wanted)
    calib, held_out = _load_eval(config, model, source)
    if len(calib) > config.max_calibration_samples:
        calib = calib.take(slice(0, config.max_calibration_samples))
    if len(calib) == 0:
        raise CalibrationDataError(f"{source.source}: no calibration samples left after holding out evaluation ones")
    fixed_batch = model_batch_size(specs, preferred=0) != 0
    batch = model_batch_size(specs, preferred=min(16, len(calib)))
    schemes = list(config.schemes or target.quant_candidates(model))
    if not schemes:
        raise UsageError(f"target {target.name!r} proposes no quantization scheme")
    notes: list[str] = []
    if config.transformer_fusion and looks_like_transformer(model):
        fusion = fuse_transformer(model)
        model = fusion.model
        notes.append(fusion.note)
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
            f"no --eval data: quality measured on the last {len(held_out)} calibration samples, held out of calibration"
        )

    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp_dir:
        tmp = Path(tmp_dir)
        fp32_path = _preprocess(model, tmp, notes)
        cache = tmp / f"calibration_{config.calibration_method.value}.json"
        reader = CalibrationReader(calib, batch, fixed_batch=fixed_batch)
        try:
            calibration_batches = collect_ranges(
                fp32_path,
                iter(reader.get_next, None),
                config.calibration_method.to_ort(),
                cache,
                op_types=_op_types(fp32_path, config.exclude_op_types),
            )
        except CalibrationDataError:
            raise
        except Exception as e:
            raise CalibrationDataError(
                f"{source.source}: {config.calibration_method.value} calibration failed: {_error_line(e)}"
            ) from e
        eval_batch = model_batch_size(specs, preferred=32)
        fp32_session = target.session(fp32_path, threads=config.threads)
        reference = run_outputs(fp32_session, held_out, eval_batch)
        first = reference[0]  # ragged (an object array of per-sample outputs) for variable-length inputs
        first_shape = (len(first), *first[0].shape) if first.dtype == object else tuple(first.shape)
        gate = QualityGate.resolve(config.metric, config.tolerance, held_out.labels is not None, first_shape)
        if gate.metric is Metric.ACCURACY and held_out.labels is None:
            raise CalibrationDataError(
                f"{held_out.source}: accuracy needs a 'label' array", hint="or use --metric agreement"
            )
        fp32_score = score(gate.metric, reference, reference, held_out.labels)
        run = _Run(tmp, fp32_path, cache, config, target, held_out, eval_batch, gate, reference, fp32_score)

        candidates: list[CandidateResult] = []
        paths: dict[str, Path] = {}
        scheme_of: dict[str, QuantScheme] = {}
        for scheme in schemes:
            result = CandidateResult(scheme.label)
            candidates.append(result)
            start = time.perf_counter()
            try:
                dest = run.quantize(scheme)
                result.score = run.score(dest)
            except Exception as e:  # one failing scheme must not sink the others
                result.error = _error_line(e)
                continue
            _log.debug("quantized %s in %.1fs", scheme.label, time.perf_counter() - start)
            result.meets_tolerance = gate.passes(result.score, fp32_score)
            result.bytes = dest.stat().st_size
            paths[scheme.label] = dest
            scheme_of[scheme.label] = scheme

        if not paths:
            raise QualityGateError(
                "every quantization scheme failed: " + "; ".join(f"{c.scheme}: {c.error}" for c in candidates),
                hint="try --exclude-op on the op named above",
            )

        def time_all() -> dict:
            sessions = {"fp32": fp32_session} | {
                label: target.session(path, threads=config.threads) for label, path in paths.items()
            }
            feeds = _latency_feeds(held_out, model_batch_size(specs, preferred=1))
            timings = compare_latency(sessions, feeds, rounds=config.latency_rounds)
            for c in candidates:
                if c.scheme in timings:
                    c.latency = timings[c.scheme]
                    c.speedup = timings["fp32"].p50_ms / c.latency.p50_ms
            return timings

        timings = time_all()
        search: MixedPrecisionSearch | None = None
        step_paths: dict[tuple[str, ...], Path] = {}
        timed = [c for c in candidates if c.latency is not None]
        fastest = _fastest(timed)
        # Mixed precision starts from the fastest candidate. When dynamic int8 missed the gate too it
        # gets its own search (its MatMuls back to float, ranked on its static QDQ twin), and the
        # timing decides between the two: on MiniLM static QDQ needed ~70 nodes in float (1.1x fp32)
        # while dynamic missed the worst sentence by a few thousandths.
        to_search = [fastest] if config.mixed_precision and not fastest.meets_tolerance else []
        if to_search:
            to_search += [c for c in timed if c is not fastest and not c.meets_tolerance
                          and scheme_of[c.scheme].method is QuantMethod.DYNAMIC][:1]
        for base in to_search:
            if scheme_of[base.scheme].method is QuantMethod.FP16:
                notes.append(f"mixed precision skipped on {base.scheme}: fp16 has no per-node int8 to undo")
                continue
            found = None
            try:
                found, step_paths = _mixed_precision(
                    run, scheme_of[base.scheme], paths[base.scheme], calib, batch, fixed_batch
                )
            except Exception as e:  # the analysis is an improvement, not a requirement
                notes.append(f"mixed precision could not run on {base.scheme}: {_error_line(e)}")
            if found is None:
                continue
            search = found
            step = search.best or max(
                (s for s in search.steps if s.score is not None),
                key=lambda s: s.score if gate.higher_is_better else -s.score,
                default=None,
            )
            if step is None:
                notes.append(f"mixed precision on {base.scheme}: no step could be scored")
                continue
            label = f"{base.scheme} + {len(step.float_nodes)} float node(s)"
            mixed = CandidateResult(label, score=step.score, meets_tolerance=step.meets_tolerance)
            mixed.float_nodes = list(step.float_nodes)
            path = step_paths.get(step.float_nodes)
            if path is not None:
                mixed.bytes = path.stat().st_size
                candidates.append(mixed)
                paths[label] = path
                scheme_of[label] = scheme_of[base.scheme]
                timings = time_all()
            notes.append(
                f"mixed precision on {base.scheme}: {len(step.float_nodes)} node(s) back to float "
                f"({', '.join(step.float_nodes[:6])}{', ...' if len(step.float_nodes) > 6 else ''}), "
                f"{gate.format(base.score)} -> {gate.format(step.score)}"
                + ("" if step.meets_tolerance else ": still over tolerance")
            )

        passing = [c for c in candidates if c.meets_tolerance and c.latency is not None]
        if passing:
            chosen = _fastest(passing)
        else:
            measured = [c for c in candidates if c.score is not None and c.scheme in paths]
            chosen = max(measured, key=lambda c: c.score if gate.higher_is_better else -c.score)
        layer_errors: list[NodeError] = []
        if config.error_report and scheme_of[chosen.scheme].method is not QuantMethod.STATIC:
            notes.append(f"per-layer error report skipped: {chosen.scheme} has no QDQ nodes to measure")
        elif config.error_report:
            try:
                layer_errors = _layer_errors(
                    run, scheme_of[chosen.scheme], paths[chosen.scheme], chosen, calib, batch, fixed_batch
                )
            except Exception as e:
                notes.append(f"per-layer error report failed: {_error_line(e)}")
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
        mixed_precision=search,
        layer_errors=layer_errors,
        calibration_batches=calibration_batches,
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


def _mixed_precision(
    run: _Run, scheme: QuantScheme, path: Path, calib, batch: int, fixed_batch: bool
) -> tuple[MixedPrecisionSearch, dict[tuple[str, ...], Path]]:
    """Rank ``scheme``'s quantized nodes by local SQNR on calibration samples; search float nodes."""
    static = scheme.method is QuantMethod.STATIC
    qdq_path = path if static and scheme.format is QuantFormat.QDQ else run.quantize(_qdq_twin(scheme))
    errors = measure_node_errors(
        run.fp32_path, qdq_path, _analysis_batches(calib, run.config.analysis_samples, batch, fixed_batch)
    )
    errors = [e for e in errors if e.node not in run.config.exclude_nodes]
    if static:
        groups = node_groups(onnx.load(str(qdq_path), load_external_data=False), [e.node for e in errors])
    else:  # dynamic: only its integer MatMuls can go back to float, each on its own
        errors = [e for e in errors if e.op_type in _DYNAMIC_OP_TYPES]
        groups = {e.node: (e.node,) for e in errors}
    step_paths: dict[tuple[str, ...], Path] = {}

    def evaluate(float_nodes: tuple[str, ...]) -> tuple[float, bool]:
        dest = run.quantize(scheme, float_nodes)
        step_paths[float_nodes] = dest
        value = run.score(dest)
        return value, run.gate.passes(value, run.fp32_score)

    search = search_float_nodes(
        scheme.label,
        rank_nodes(errors),
        groups,
        evaluate,
        max_float_fraction=run.config.max_float_fraction,
        max_steps=run.config.mixed_precision_steps,
    )
    return search, step_paths


def _layer_errors(
    run: _Run, scheme: QuantScheme, path: Path, chosen: CandidateResult, calib, batch: int, fixed_batch: bool
) -> list[NodeError]:
    """Per-node error of the kept model (of its QDQ twin when it is QOperator) on calibration samples."""
    qdq_path = path if scheme.format is QuantFormat.QDQ else run.quantize(_qdq_twin(scheme), chosen.float_nodes)
    return measure_node_errors(
        run.fp32_path, qdq_path, _analysis_batches(calib, run.config.analysis_samples, batch, fixed_batch)
    )
