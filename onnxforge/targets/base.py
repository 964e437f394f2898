"""What a target is: an onnxruntime execution provider setup that can make sessions and that
knows which quantization formats it runs fast."""

from __future__ import annotations

import enum
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from onnxforge import _ort_logs
from onnxforge.errors import InvalidModelError, TargetUnavailableError, first_line

if TYPE_CHECKING:
    from onnxforge.targets.session_settings import SessionSettings

__all__ = ["ActivationType", "QuantFormat", "QuantMethod", "QuantScheme", "QuantScope", "Target"]


class QuantMethod(enum.Enum):
    """How the low-precision model is made: static int8 (calibrated activation ranges), dynamic int8
    (int8 weights, activation ranges computed at run time: no calibration), fp16 (a cast, for GPUs), or
    int4 weight-only (MatMul weights in 4-bit blocks, onnxruntime's MatMulNBits)."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    FP16 = "fp16"
    INT4 = "int4"


class QuantScope(enum.Enum):
    """Which nodes a static scheme quantizes: every op onnxruntime can quantize, or only the MatMuls
    with a constant weight, their outputs left in float (onnxruntime then runs each as
    MatMulIntegerToFloat: int8 inputs, fp32 output, nothing requantized)."""

    ALL = "all"
    WEIGHT_MATMUL = "matmul"
    # only the op types measured faster in int8 than in float on the target (quantize.op_classes)
    PROFILED = "profiled"


class QuantFormat(enum.Enum):
    QDQ = "qdq"
    QOPERATOR = "qoperator"


class ActivationType(enum.Enum):
    UINT8 = "uint8"
    INT8 = "int8"


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """One way to quantize: the format, the activation type (weights are int8), weight granularity,
    and the options that change which graph is quantized:

    - ``scope``: static only; every quantizable op, or weight MatMuls only with float outputs;
    - ``smooth``: SmoothQuant-style scale migration first (activation outliers moved into the weights);
    - ``percentile``: static only; percentile calibration instead of the config's method;
    - ``int8_embeddings``: embedding tables (Gather on a large float table) stored int8 with per-row scales.
    """

    format: QuantFormat
    activations: ActivationType
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights, for x86 CPUs without VNNI (avoids int16 saturation)
    method: QuantMethod = QuantMethod.STATIC  # DYNAMIC ignores format/activations; FP16/INT4 all but method
    scope: QuantScope = QuantScope.ALL
    smooth: bool = False
    percentile: bool = False
    int8_embeddings: bool = False

    def __post_init__(self) -> None:
        # One spelling per model: options a method ignores are reset, so equal labels mean equal schemes.
        ignored: dict[str, object] = {}
        if self.method is not QuantMethod.STATIC:
            ignored |= {"scope": QuantScope.ALL, "percentile": False}
        if self.method is QuantMethod.FP16:
            ignored |= {"smooth": False, "int8_embeddings": False}
        if self.method is QuantMethod.INT4:
            ignored |= {"smooth": False, "per_channel": True, "reduce_range": False}
        for name, value in ignored.items():
            object.__setattr__(self, name, value)

    @property
    def label(self) -> str:
        gran = "per-channel" if self.per_channel else "per-tensor"
        if self.method is QuantMethod.FP16:
            return "FP16"
        if self.method is QuantMethod.INT4:
            base = "INT4"
        elif self.method is QuantMethod.DYNAMIC:
            base = f"DYNAMIC S8 {gran}" + (" reduce-range" if self.reduce_range else "")
        else:
            act = "U8" if self.activations is ActivationType.UINT8 else "S8"
            base = f"{self.format.name} {act}S8 {gran}" + (" reduce-range" if self.reduce_range else "")
            if self.scope is QuantScope.WEIGHT_MATMUL:
                base += " matmul"
            elif self.scope is QuantScope.PROFILED:
                base += " profiled"
        if self.smooth:
            base += " smooth"
        if self.percentile:
            base += " percentile"
        return base + (" int8-embeddings" if self.int8_embeddings else "")


@functools.cache
def _runs_matmul_nbits(target: Target) -> bool:
    k, n, block = 32, 8, 16
    packed = np.full((n, k // block, block // 2), 0x88, np.uint8)  # every weight 0 (zero point 8)
    node = onnx.helper.make_node("MatMulNBits", ["a", "b", "scales"], ["y"], domain="com.microsoft",
                                 K=k, N=n, bits=4, block_size=block)
    graph = onnx.helper.make_graph(
        [node], "probe", [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, k])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
        [onnx.numpy_helper.from_array(packed, "b"),
         onnx.numpy_helper.from_array(np.ones(n * k // block, np.float32), "scales")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    try:
        session = target.session(model.SerializeToString(), threads=1)
        session.run(None, {"a": np.ones((1, k), np.float32)})
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Target:
    """Base target. Subclasses set ``name``, ``providers`` and ``quant_candidates``."""

    name: str = "base"
    providers: tuple[str, ...] = ()
    install_hint: str = ""
    # Channel counts this target runs fastest in multiples of (CPU: onnxruntime's NCHWc blocks of 8;
    # GPU tensor cores want 8 as well). Structured pruning rounds to it when a search drives it.
    channel_multiple: int = 8
    # What the search's latency estimate charges (``search.timing.cost_estimate``): one kernel launch at
    # batch 1 in multiply-accumulates of float compute, and how much faster an int8 MAC runs than a float
    # one. Defaults: what the CPU measured (see CpuTarget); a target measured otherwise sets its own.
    kernel_overhead_macs: int = 180_000
    int8_mac_speedup: float = 3.0

    def unavailable_reason(self) -> str | None:
        """None when usable here, else a one-line reason."""
        available = set(ort.get_available_providers())
        missing = [p for p in self.providers if p not in available]
        if missing:
            return (
                f"target {self.name!r} needs {missing[0]}, but this onnxruntime "
                f"({ort.__version__}) offers only {', '.join(sorted(available))}"
            )
        return None

    def require(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise TargetUnavailableError(reason, hint=self.install_hint or None)

    def quant_candidates(self, model: onnx.ModelProto | None = None) -> list[QuantScheme]:
        """Quantization schemes worth measuring on this target for ``model``, most promising first."""
        return [
            QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.UINT8),
            QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.INT8),
        ]

    def matmul_candidates(self) -> list[QuantScheme]:
        """The schemes this target adds for MatMul-dominated models (transformers); none by default."""
        return []

    def runs_matmul_nbits(self) -> bool:
        """True when a 4-bit ``MatMulNBits`` (com.microsoft) loads and runs here: where int4 is a candidate."""
        return _runs_matmul_nbits(self)

    def session_options(self, threads: int | None, *, interleaved: bool = False) -> ort.SessionOptions:
        options = _ort_logs.session_options()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if interleaved:
            # Sessions timed in turn in one process: an idle session's intra-op threads spin for work
            # and compete for the cores the running one needs. On the shared 2-core box under load, a
            # BERT encoder timed against a copy of itself ran at p50 23-27 ms spinning, 6-11 ms not
            # (the a/b ratio noise was about the same, +-15%); a pruned copy was once reported 4.59x
            # faster (11.07 vs 2.41 ms) where run alone it is about 1.3x.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def provider_options(self) -> list[tuple[str, dict]]:
        return [(p, {}) for p in self.providers]

    def session(
        self,
        model: str | os.PathLike | bytes | onnx.ModelProto,
        *,
        threads: int | None = None,
        profile_prefix: str | None = None,
        interleaved: bool = False,
        name: str | None = None,
        low_memory: bool = False,
        settings: SessionSettings | None = None,
    ) -> ort.InferenceSession:
        """An InferenceSession on this target; a model onnxruntime cannot load is InvalidModelError.

        ``model``: a path, serialized bytes, or a ModelProto (one past protobuf's 2 GB is handed over as
        a temporary file with external data). ``name``: what errors call it (default: the path, or "the
        model"). With ``profile_prefix`` onnxruntime's profiler is on and writes ``<prefix>_<date>.json``.
        ``interleaved``: the session is timed in turn with others (``compare_latency``), so its
        thread pool does not spin between runs (see ``session_options``).
        ``low_memory`` turns off the CPU arena and memory patterns: memory goes back after each run
        (for sessions that score or analyse under a memory limit; never for timing).
        ``settings``: session options measured for this model (``session_settings``, its ``.session.json``);
        their thread count wins over ``threads``.
        A provider that onnxruntime could not start is TargetUnavailableError, not a CPU fallback.
        """
        if isinstance(model, onnx.ModelProto):
            from onnxforge.model_io import runnable

            with runnable(model) as source:
                return self.session(source, threads=threads, profile_prefix=profile_prefix, interleaved=interleaved,
                                    name=name or "the model", low_memory=low_memory, settings=settings)
        self.require()
        source = model if isinstance(model, bytes) else str(model)
        where = name or ("the model" if isinstance(model, bytes) else str(model))
        if settings is not None and settings.intra_op_threads is not None:
            threads = settings.intra_op_threads
        options = self.session_options(threads, interleaved=interleaved)
        if settings is not None:
            settings.apply(options)
        if low_memory:
            options.enable_cpu_mem_arena = False
            options.enable_mem_pattern = False
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=self.provider_options())
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            raise InvalidModelError(
                f"{where}: onnxruntime cannot load it on target {self.name!r}: {first_line(e)}"
            ) from e
        self.check_placement(session)
        _explain_run_failures(session, where, self.name)
        return session

    def check_placement(self, session: ort.InferenceSession) -> None:
        """Refuse a session that silently dropped one of our providers.

        onnxruntime only logs a warning when a requested provider fails to start (missing CUDA or
        TensorRT libraries, no GPU) and then runs everything on the CPU; a latency from that session
        would be reported under the wrong target.
        """
        started = session.get_providers()
        missing = [name for name, _ in self.provider_options() if name not in started]
        if missing:
            raise TargetUnavailableError(
                f"target {self.name!r}: onnxruntime could not start {missing[0]} and fell back to "
                f"{', '.join(started)}",
                hint=self.install_hint or None,
            )


def _explain_run_failures(session: ort.InferenceSession, where: str, target: str) -> None:
    """Make ``session.run`` raise InvalidModelError when onnxruntime fails inside the graph.

    A model can load and still fail on every run (found by fuzzing: a Conv whose declared input
    has 0 channels, a Reshape to an impossible shape). onnxruntime raises its own Fail /
    InvalidArgument / RuntimeException types; every caller (profile, quantize, the runner) would
    otherwise report them as an internal error. The wrapper costs one Python call per run.
    """
    run = session.run
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the failure is raised with onnxruntime's message; its log line would repeat it

    def checked_run(output_names, input_feed, run_options=None):
        try:
            return run(output_names, input_feed, run_options or quiet)
        except Exception as e:
            raise InvalidModelError(
                f"{where}: onnxruntime failed running it on target {target!r}: {first_line(e)}",
                hint="check the model's declared input shapes (onnxforge inspect) and the data fed to it",
            ) from e

    session.run = checked_run
