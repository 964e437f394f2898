"""Mobile target: readiness for ONNX Runtime Mobile (Android NNAPI, iOS CoreML), the ORT-format
model with its reduced-build operator config, and a host-side latency labelled as emulation.

Steps, each done by ``onnxruntime.tools``:
1. fix every dynamic input dimension (``make_input_shape_fixed`` + ``fix_output_shapes``): NNAPI
   cannot run dynamically shaped values, and CoreML runs them slowly;
2. the usability checker (``mobile_helpers.usability_checker``), called per EP on the model as given
   and on the fixed one: YES / MAYBE / NO, partitions, supported nodes, unsupported ops. It decides
   from op types and shapes only (its caveats are not checked), so YES means "worth trying";
3. ``convert_onnx_models_to_ort`` (optimization style Fixed, target platform arm) writes ``.ort`` and
   ``required_operators.config`` (the op list for a reduced onnxruntime build);
4. the ``.ort`` is loaded and its outputs compared with the fixed ``.onnx`` on the same inputs.

Latency on this host with a phone-like thread budget is *host emulation*, not a device measurement:
a phone core is slower, and NNAPI/CoreML are not in the Linux wheel. XNNPACK ships in the Android
and iOS packages, not the PyPI Linux wheel; it is used when ``ort.get_available_providers()`` has it.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxforge.errors import InvalidModelError, OutputPathError, QualityGateError, UsageError, first_line
from onnxforge.parity import ParityReport, Tolerance, compare_models
from onnxforge.pipeline.codec import JsonResult
from onnxforge.targets.base import ActivationType, QuantFormat, QuantScheme, Target
from onnxforge.targets.latency import LatencyStats, measure_latency

__all__ = [
    "EpVerdict",
    "MobileConfig",
    "MobileEp",
    "MobileResult",
    "MobileTarget",
    "Readiness",
    "check_mobile_usability",
    "prepare_mobile",
    "xnnpack_available",
]

XNNPACK = "XnnpackExecutionProvider"
MOBILE_THREADS = 2  # ORT Mobile guidance: intra-op threads = the phone's big cores, commonly 2-4
_MOBILE_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)  # frozen, so one instance serves every config


def xnnpack_available() -> bool:
    """True when this onnxruntime build offers the XNNPACK execution provider."""
    return XNNPACK in ort.get_available_providers()


@dataclass(frozen=True)
class MobileTarget(Target):
    """Runs on this host's CPU (with XNNPACK when the build has it) under a phone-like thread budget."""

    name: str = "mobile"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    install_hint: str = (
        "NNAPI/CoreML/XNNPACK ship in onnxruntime-android (Maven) and onnxruntime-objc/-c (CocoaPods); "
        "on a Linux host only the CPU emulation runs"
    )
    threads: int = MOBILE_THREADS

    def provider_options(self) -> list[tuple[str, dict]]:
        if xnnpack_available():
            return [(XNNPACK, {"intra_op_num_threads": str(self.threads)}), ("CPUExecutionProvider", {})]
        return [("CPUExecutionProvider", {})]

    def session_options(self, threads: int | None, *, interleaved: bool = False) -> ort.SessionOptions:
        options = super().session_options(threads or self.threads, interleaved=interleaved)
        if xnnpack_available():
            # XNNPACK runs its own pool; ORT's pool spinning beside it only steals cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def quant_candidates(self, model=None) -> list[QuantScheme]:
        # NNAPI and XNNPACK run QDQ with uint8 activations; NNAPI is happiest with per-tensor weights.
        # CoreML rejects QDQ graphs altogether (checker verdict NO), so fp32 stays best there.
        u8 = ActivationType.UINT8
        return [
            QuantScheme(format=QuantFormat.QDQ, activations=u8, per_channel=False),
            QuantScheme(format=QuantFormat.QDQ, activations=u8, per_channel=True),
        ]


class MobileEp(enum.Enum):
    NNAPI = "NNAPI"
    COREML_NEURALNETWORK = "CoreML NeuralNetwork"
    COREML_MLPROGRAM = "CoreML MLProgram"


class Readiness(enum.Enum):
    YES = "YES"
    MAYBE = "MAYBE"
    NO = "NO"


@dataclass(frozen=True)
class EpVerdict(JsonResult):
    """The usability checker's verdict for one EP: YES (one partition over 75% of nodes), MAYBE, NO."""

    ep: MobileEp
    readiness: Readiness
    supported_nodes: int
    total_nodes: int
    partitions: int
    unsupported_ops: tuple[str, ...]
    nodes_unsupported_dynamic_shape: int
    caveats: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class MobileConfig:
    """``input_shapes`` gives dynamic dims other than the batch; ``batch`` fixes a dynamic first dim."""

    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    batch: int = 1
    threads: int = MOBILE_THREADS
    tolerance: Tolerance = _MOBILE_TOLERANCE
    measure_latency: bool = True
    min_seconds: float = 1.0


@dataclass
class MobileResult(JsonResult):
    source: Path
    fixed_onnx: Path
    ort_model: Path
    operators_config: Path
    fixed_inputs: dict[str, tuple[int, ...]]  # inputs whose shape was made static
    verdicts_as_given: list[EpVerdict]
    verdicts: list[EpVerdict]  # on the fixed model
    required_operators: list[str]
    # saved as ort_parity, xnnpack_available and host_emulation_latency (with the threads and its label)
    parity: ParityReport = field(metadata={"json": False})
    xnnpack: bool = field(metadata={"json": False})
    host_latency: LatencyStats | None = field(default=None, metadata={"json": False})
    threads: int = field(default=MOBILE_THREADS, metadata={"json": False})
    notes: list[str] = field(default_factory=list)

    def json_extra(self) -> dict[str, Any]:
        latency = None
        if self.host_latency is not None:
            latency = {**self.host_latency.to_json(), "threads": self.threads,
                       "label": "host emulation, not a device measurement"}
        return {"ort_parity": self.parity, "xnnpack_available": self.xnnpack, "host_emulation_latency": latency}


def check_mobile_usability(model_path: str | os.PathLike) -> list[EpVerdict]:
    """Run onnxruntime's usability checker per EP on ``model_path`` (after its BASIC optimizations,
    as the ORT-format conversion would do) and return its verdicts."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    checks = {
        MobileEp.NNAPI: lambda m, fixed: uc.check_nnapi_partitions(m, fixed),
        MobileEp.COREML_NEURALNETWORK: lambda m, fixed: uc.check_coreml_partitions(
            m, fixed, "coreml_supported_neuralnetwork_ops.md"
        ),
        MobileEp.COREML_MLPROGRAM: lambda m, fixed: uc.check_coreml_partitions(
            m, fixed, "coreml_supported_mlprogram_ops.md"
        ),
    }
    path = Path(model_path)
    with tempfile.TemporaryDirectory(prefix="onnxforge-mobile-check-") as tmp:
        optimized = Path(tmp) / path.name
        try:
            optimize_model(path, optimized, use_external_initializers=True)
            shaped = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        except Exception as e:  # onnxruntime / onnx shape inference errors
            raise InvalidModelError(f"{path}: the mobile usability checker cannot read it: {first_line(e)}") from e
    verdicts = []
    for ep, check in checks.items():
        try:
            info = check(shaped, True)
        except ValueError:  # no value_info to judge shapes by: judge the ops only
            info = check(shaped, False)
        verdicts.append(
            EpVerdict(
                ep=ep,
                readiness=Readiness(info.suitability().name),
                supported_nodes=info.num_supported_nodes,
                total_nodes=info.num_nodes,
                partitions=info.num_partitions,
                unsupported_ops=tuple(sorted(info.unsupported_ops)),
                nodes_unsupported_dynamic_shape=info.nodes_unsupported_due_to_dynamic_input,
                caveats=tuple(info.supported_ops_checker.get_caveats()),
            )
        )
    return verdicts


def _fix_shapes(model: onnx.ModelProto, config: MobileConfig) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    from onnxforge.model_io import input_specs
    from onnxforge.targets.feeds import resolve_shape

    unknown = set(config.input_shapes) - {s.name for s in input_specs(model)}
    if unknown:
        raise UsageError(f"--input-shape names {sorted(unknown)[0]!r}, which is not a model input")
    fixed: dict[str, tuple[int, ...]] = {}  # edits ``model`` in place: the caller's freshly loaded copy
    _name_anonymous_dims(model)
    for spec in input_specs(model):
        if spec.is_static and spec.name not in config.input_shapes:
            continue
        shape = resolve_shape(spec, config.batch, config.input_shapes)
        if spec.is_static:
            continue  # resolve_shape checked that the given shape matches
        try:
            make_input_shape_fixed(model.graph, spec.name, list(shape))
        except ValueError as e:
            raise UsageError(f"cannot fix input {spec.name!r} to {'x'.join(map(str, shape))}: {e}") from e
        fixed[spec.name] = shape
    if fixed:
        try:
            fix_output_shapes(model)
        except Exception as e:  # onnx shape inference / checker failures
            raise InvalidModelError(f"shape inference failed after fixing input shapes: {first_line(e)}") from e
    return model, fixed


_ANONYMOUS = {"", "?", "-1"}


def _name_anonymous_dims(model: onnx.ModelProto) -> None:
    """Give each anonymous dynamic input dim its own name, so that each can be fixed to its own size.

    onnxruntime's ``make_input_shape_fixed`` fixes a dim_param everywhere it appears: PaddleOCR's
    ``[?, 3, ?, ?]`` (three dims all named ``?``) or ``[-1, 3, -1, -1]`` could not take H != W (and a
    declared -1 is not even a dim_param). ``?``, ``-1`` and unnamed dims are anonymous by definition;
    a real name shared by several dims (``batch``) still means they are equal and is left alone.
    """
    for vi in model.graph.input:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            anonymous = (d.HasField("dim_value") and d.dim_value < 0) or (
                not d.HasField("dim_value") and d.dim_param in _ANONYMOUS)
            if anonymous:
                d.Clear()
                d.dim_param = f"{vi.name}_dim{axis}"


def _convert_to_ort(fixed_path: Path, out_dir: Path) -> tuple[Path, Path]:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    sink = io.StringIO()  # the converter prints progress; our CLI owns stdout (JSON may go there)
    config_logger = logging.getLogger("ort_format_model.utils")  # logs "Created config" at INFO to stderr
    level = config_logger.level
    config_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sink):
            convert_onnx_models_to_ort(
                fixed_path, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed], target_platform="arm"
            )
    except Exception as e:
        raise InvalidModelError(f"{fixed_path.name}: conversion to ORT format failed: {first_line(e)}") from e
    finally:
        config_logger.setLevel(level)
    ort_model = out_dir / (fixed_path.stem + ".ort")
    configs = sorted(out_dir.glob("*required_operators*.config"))
    if not ort_model.exists() or not configs:
        raise InvalidModelError(
            f"{fixed_path.name}: the ORT converter wrote no .ort/.config ({sink.getvalue()[-200:]})"
        )
    return ort_model, configs[0]


def prepare_mobile(
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: MobileConfig = MobileConfig(),
    feeds: Mapping[str, np.ndarray] | None = None,
) -> MobileResult:
    """Fix shapes, check usability per EP, convert to ORT format, check .ort parity, time it on the host.

    Writes ``<stem>.fixed.onnx``, ``<stem>.ort`` and ``required_operators.config`` into ``output_dir``
    (each renamed into place complete). ``feeds`` (default: generated from the fixed shapes) drive the
    parity check and the host-emulation latency.
    """
    from onnxforge.model_io import input_specs, load_model, save_model
    from onnxforge.targets.feeds import generate_feeds

    source = Path(model_path)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"mobile output {out} is a file, expected a folder")
    model = load_model(source)
    fixed_model, fixed_inputs = _fix_shapes(model, config)  # bad shapes fail before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create mobile output folder {out}: {e.strerror}") from e
    stem = source.stem
    notes = []
    with tempfile.TemporaryDirectory(prefix=".onnxforge-mobile-", dir=out) as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        fixed_tmp = save_model(fixed_model, work / "src" / f"{stem}.fixed.onnx")
        verdicts_as_given = check_mobile_usability(source)
        verdicts = check_mobile_usability(fixed_tmp) if fixed_inputs else verdicts_as_given
        ort_tmp, config_tmp = _convert_to_ort(fixed_tmp, work / "ort")
        random_feeds = feeds is None
        if feeds is None:
            feeds = generate_feeds(input_specs(fixed_model), batch=config.batch, model=fixed_model)
        parity = compare_models(str(fixed_tmp), str(ort_tmp), [dict(feeds)], config.tolerance)
        host_latency = None
        if config.measure_latency:
            session = MobileTarget(threads=config.threads).session(ort_tmp)
            host_latency = measure_latency(session, feeds, min_seconds=config.min_seconds)
        # Rename into place: data files before the model that names them, the .ort last.
        fixed_path = out / f"{stem}.fixed.onnx"
        for produced in sorted((work / "src").iterdir(), key=lambda p: p.suffix == ".onnx"):
            os.replace(produced, out / produced.name)
        config_path = out / "required_operators.config"
        os.replace(config_tmp, config_path)
        ort_path = out / f"{stem}.ort"
        os.replace(ort_tmp, ort_path)
    required = [
        line.strip() for line in config_path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    if not parity.ok:
        raise QualityGateError(
            f"{ort_path}: the ORT-format model's outputs differ from {source.name}: {parity.summary()}",
            hint="the files are kept for inspection; "
            + (
                "the check ran on random inputs, where large activations can drift though real ones do not: "
                "check with --data real.npz, else report the op that drifts to onnxruntime"
                if random_feeds
                else "report the op that drifts to onnxruntime"
            ),
            best_path=str(ort_path),
        )
    if not fixed_inputs:
        notes.append("all input shapes were already static")
    if not xnnpack_available():
        notes.append(
            "XNNPACK is not in this onnxruntime build (it ships in the Android/iOS packages); host CPU EP used"
        )
    return MobileResult(
        source=source,
        fixed_onnx=fixed_path,
        ort_model=ort_path,
        operators_config=config_path,
        fixed_inputs=fixed_inputs,
        verdicts_as_given=verdicts_as_given,
        verdicts=verdicts,
        required_operators=required,
        parity=parity,
        xnnpack=xnnpack_available(),
        host_latency=host_latency,
        threads=config.threads,
        notes=notes,
    )
