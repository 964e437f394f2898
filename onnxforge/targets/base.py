"""What a target is: an onnxruntime execution provider setup that can make sessions and that
knows which quantization formats it runs fast."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import onnx
import onnxruntime as ort

from onnxforge.errors import InvalidModelError, TargetUnavailableError

__all__ = ["Target", "QuantScheme", "QuantFormat", "ActivationType", "QuantMethod"]


class QuantMethod(enum.Enum):
    """How the low-precision model is made: static int8 (calibrated activation ranges), dynamic int8
    (int8 weights, activation ranges computed at run time: no calibration), or fp16 (a cast, for GPUs)."""

    STATIC = "static"
    DYNAMIC = "dynamic"
    FP16 = "fp16"


class QuantFormat(enum.Enum):
    QDQ = "qdq"
    QOPERATOR = "qoperator"


class ActivationType(enum.Enum):
    UINT8 = "uint8"
    INT8 = "int8"


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """One way to quantize: the format, the activation type (weights are int8), and weight granularity."""

    format: QuantFormat
    activations: ActivationType
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights, for x86 CPUs without VNNI (avoids int16 saturation)
    method: QuantMethod = QuantMethod.STATIC  # DYNAMIC ignores format/activations; FP16 ignores all but method

    @property
    def label(self) -> str:
        if self.method is QuantMethod.FP16:
            return "FP16"
        if self.method is QuantMethod.DYNAMIC:
            gran = "per-channel" if self.per_channel else "per-tensor"
            return f"DYNAMIC S8 {gran}" + (" reduce-range" if self.reduce_range else "")
        act = "U8" if self.activations is ActivationType.UINT8 else "S8"
        gran = "per-channel" if self.per_channel else "per-tensor"
        return f"{self.format.name} {act}S8 {gran}" + (" reduce-range" if self.reduce_range else "")


@dataclass(frozen=True)
class Target:
    """Base target. Subclasses set ``name``, ``providers`` and ``quant_candidates``."""

    name: str = "base"
    providers: tuple[str, ...] = ()
    install_hint: str = ""
    # Channel counts this target runs fastest in multiples of (CPU: onnxruntime's NCHWc blocks of 8;
    # GPU tensor cores want 8 as well). Structured pruning rounds to it when a search drives it.
    channel_multiple: int = 8

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

    def session_options(self, threads: int | None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        return options

    def provider_options(self) -> list[tuple[str, dict]]:
        return [(p, {}) for p in self.providers]

    def session(
        self,
        model: str | os.PathLike | bytes,
        *,
        threads: int | None = None,
        profile_prefix: str | None = None,
    ) -> ort.InferenceSession:
        """An InferenceSession on this target; a model onnxruntime cannot load is InvalidModelError.

        With ``profile_prefix`` onnxruntime's profiler is on and writes ``<prefix>_<date>.json``.
        A provider that onnxruntime could not start is TargetUnavailableError, not a CPU fallback.
        """
        self.require()
        source = model if isinstance(model, bytes) else str(model)
        options = self.session_options(threads)
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=self.provider_options())
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            where = "the model" if isinstance(model, bytes) else str(model)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModelError(
                f"{where}: onnxruntime cannot load it on target {self.name!r}: {first[:300]}"
            ) from e
        self.check_placement(session)
        _explain_run_failures(session, "the model" if isinstance(model, bytes) else str(model), self.name)
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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidModelError(
                f"{where}: onnxruntime failed running it on target {target!r}: {first[:300]}",
                hint="check the model's declared input shapes (onnxforge inspect) and the data fed to it",
            ) from e

    session.run = checked_run
