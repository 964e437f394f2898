"""``onnxforge profile``: latency of a model on a target over batch sizes and thread counts,
with inputs from the user's samples or generated from the declared shapes; optionally a per-op
profile (op_profile.py), a side-by-side comparison with a second model, and, for the mobile
target, the ORT-format package and readiness verdicts (mobile.py).

Latency rows time ``session.run`` wall-clock per call after warm-up (see latency.py). The
comparison runs both models interleaved in one process (compare_latency) and reports the ratio
of their p50s, the number that holds on a noisy machine. On the mobile target, rows time the
``.ort`` model on this host with the mobile thread budget: host emulation, not a device number.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxforge.errors import UsageError
from onnxforge.model_io import input_specs, load_model
from onnxforge.pipeline.codec import JsonResult
from onnxforge.pipeline.progress import Progress, ignore, step
from onnxforge.targets import get_target
from onnxforge.targets.feeds import generate_feeds
from onnxforge.targets.latency import LatencyStats, compare_latency, measure_latency
from onnxforge.targets.session_settings import SessionSettings, settings_for
from onnxforge.targets.shape_probe import ProbedShapes, probe_shapes

if TYPE_CHECKING:
    from onnxforge.targets.mobile import MobileResult
    from onnxforge.targets.op_profile import OpProfile

__all__ = ["Comparison", "ProfileConfig", "ProfileResult", "profile"]


@dataclass(frozen=True, kw_only=True)
class ProfileConfig(JsonResult):
    target: str = "cpu"
    batch_sizes: tuple[int, ...] = (1,)
    threads: tuple[int | None, ...] = (None,)
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    sample_data: Path | None = None
    # the JSON names what was profiled; run counts and the mobile output folder were never part of it
    warmup: int = field(default=5, metadata={"json": False})
    min_runs: int = field(default=20, metadata={"json": False})
    min_seconds: float = field(default=1.0, metadata={"json": False})
    per_op: bool = False  # also profile per node / op type with onnxruntime's profiler
    per_op_runs: int = field(default=50, metadata={"json": False})
    compare: Path | None = None  # a second model timed side by side with the first
    mobile_dir: Path | None = field(default=None, metadata={"json": False})  # mobile: where .ort and ops config go


@dataclass
class ProfileRow(JsonResult):
    batch: int
    threads: int | None
    latency: LatencyStats = field(metadata={"json": False})  # saved flat, beside batch and threads

    def json_extra(self) -> dict[str, Any]:
        return self.latency.to_json()


@dataclass
class Comparison(JsonResult):
    """Both models timed interleaved; ``ratio`` = other p50 / model p50 (below 1: the other is faster)."""

    model: Path
    other: Path
    model_latency: LatencyStats
    other_latency: LatencyStats
    batch: int
    threads: int | None

    @property
    def ratio(self) -> float:
        return self.other_latency.p50_ms / self.model_latency.p50_ms if self.model_latency.p50_ms > 0 else float("inf")

    def json_extra(self) -> dict[str, Any]:
        return {"ratio_other_over_model": self.ratio, "speedup_of_other": 1.0 / self.ratio if self.ratio else None}


@dataclass
class ProfileResult(JsonResult):
    path: Path
    target: str
    rows: list[ProfileRow]
    # saved only when present, the per-op profile as "per_op"
    op_profile: OpProfile | None = field(default=None, metadata={"json": False})
    comparison: Comparison | None = field(default=None, metadata={"json": False})
    mobile: MobileResult | None = field(default=None, metadata={"json": False})
    host_emulation: bool = False
    inputs: str = ""  # what was fed at the first batch: the data's samples, or generated shapes (some guessed)
    # the model's .session.json applied (its changes from onnxruntime's defaults); None: the file is absent
    session_settings: dict[str, Any] | None = None

    def json_extra(self) -> dict[str, Any]:
        present = {"per_op": self.op_profile, "comparison": self.comparison, "mobile": self.mobile}
        return {key: value for key, value in present.items() if value is not None}


def _shape_overrides(model, config: ProfileConfig, batch: int,
                     probed: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """--batch sets the first dim; --input-shape gives the others, else the probed shapes (shape_probe);
    a fixed batch in the model still wins."""
    fixed_batch = {s.name for s in input_specs(model) if s.shape and isinstance(s.shape[0], int)}
    given = {**(probed or {}), **config.input_shapes}
    return {k: v if k in fixed_batch else (batch, *v[1:]) for k, v in given.items()}


def _feeds(model, config: ProfileConfig, batch: int,
           probed: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    specs = input_specs(model)
    if config.sample_data is not None:
        from onnxforge.pipeline.data_spec import load_data

        samples = load_data(config.sample_data, specs, limit=batch)  # one batch: nothing else is read
        return samples.first_batch(batch)
    return generate_feeds(specs, batch=batch, overrides=_shape_overrides(model, config, batch, probed), guess=True,
                          model=model)


def _probe(model, model_path: Path, config: ProfileConfig, target) -> ProbedShapes:
    """Sizes the model runs with for dynamic dims neither --data nor --input-shape gives (shape_probe)."""
    if config.sample_data is not None:
        return ProbedShapes()
    specs = input_specs(model)
    if not any(s.name not in config.input_shapes and any(not isinstance(d, int) for d in s.shape[1:])
               for s in specs):
        return ProbedShapes()
    return probe_shapes(target.session(model_path), specs, config.input_shapes, model)


def _describe_inputs(model, config: ProfileConfig, feeds: dict[str, np.ndarray], probed: ProbedShapes) -> str:
    shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in feeds.items())
    if config.sample_data is not None:
        return f"samples of {config.sample_data} ({shapes})"
    text = f"random inputs ({shapes})"
    if probed.shapes:
        text += f"; {probed.describe()}: give --input-shape or --data to choose"
    return text


def _with_threads(settings: SessionSettings | None, threads: int | None) -> SessionSettings | None:
    """A --threads given on the command line wins over the thread count in the model's settings."""
    if settings is None or threads is None:
        return settings
    return dataclasses.replace(settings, intra_op_threads=threads)


def _same_inputs(a, b) -> bool:
    return [(s.name, s.dtype) for s in input_specs(a)] == [(s.name, s.dtype) for s in input_specs(b)]


def profile(model_path: str | os.PathLike, config: ProfileConfig = ProfileConfig(),
            progress: Progress = ignore) -> ProfileResult:
    """Measure latency for every (batch, threads) pair; then, as configured, the per-op profile
    (first batch and thread count), the interleaved comparison, and the mobile package. Each step is
    reported to ``progress``."""
    target = get_target(config.target)
    target.require()
    model_path = Path(model_path)
    model = load_model(model_path)
    measured_path: Path = model_path
    mobile = None
    thread_counts = config.threads
    probed = _probe(model, model_path, config, get_target("cpu") if target.name == "mobile" else target)
    if target.name == "mobile":
        from onnxforge.targets.mobile import MOBILE_THREADS, MobileConfig, MobileTarget, prepare_mobile

        if len(config.batch_sizes) > 1:
            raise UsageError("the mobile target fixes input shapes: give one --batch")
        if config.compare is not None:
            raise UsageError("--compare is not supported with --target mobile; compare the .onnx files on cpu")
        phone_threads = next((t for t in config.threads if t), MOBILE_THREADS)
        mobile = prepare_mobile(
            model_path,
            config.mobile_dir or model_path.with_name(model_path.stem + "_mobile"),
            MobileConfig(input_shapes=_shape_overrides(model, config, config.batch_sizes[0], probed.shapes),
                         batch=config.batch_sizes[0], threads=phone_threads, measure_latency=False),
            feeds=_feeds(model, config, config.batch_sizes[0], probed.shapes),
        )
        target = MobileTarget(threads=phone_threads)
        measured_path = mobile.ort_model
        # onnxruntime's default would use every host core: not a phone's budget
        thread_counts = tuple(t or phone_threads for t in config.threads)
    settings = settings_for(model_path) if mobile is None else None  # the deployable's session options
    rows: list[ProfileRow] = []
    steps = len(thread_counts) * len(config.batch_sizes)
    for threads in thread_counts:
        session = target.session(measured_path, threads=threads, settings=_with_threads(settings, threads))
        for batch in config.batch_sizes:
            step(progress, "latency per batch and thread count", len(rows), steps,
                 f"batch {batch}, threads {threads or 'default'}")
            feeds = _feeds(model, config, batch, probed.shapes)
            stats = measure_latency(
                session, feeds, warmup=config.warmup, min_runs=config.min_runs, min_seconds=config.min_seconds
            )
            rows.append(ProfileRow(batch, threads, stats))
    step(progress, "latency per batch and thread count", len(rows), steps)
    if mobile is not None:
        mobile.host_latency = rows[0].latency
    result = ProfileResult(model_path, target.name, rows, mobile=mobile, host_emulation=mobile is not None,
                           session_settings=settings.changes() if settings is not None else None)
    batch, threads = config.batch_sizes[0], thread_counts[0]
    result.inputs = _describe_inputs(model, config, _feeds(model, config, batch, probed.shapes), probed)
    if config.per_op:
        from onnxforge.targets.op_profile import OpProfileConfig, profile_ops

        op_config = OpProfileConfig(target=target, threads=threads, warmup=config.warmup, runs=config.per_op_runs)
        step(progress, "per-op profile", message=f"{config.per_op_runs} profiled runs")
        result.op_profile = profile_ops(measured_path, _feeds(model, config, batch, probed.shapes), op_config)
    if config.compare is not None:
        other = load_model(config.compare)
        feeds = _feeds(model, config, batch, probed.shapes)
        other_feeds = feeds if _same_inputs(model, other) else _feeds(other, config, batch)
        other_settings = settings_for(config.compare)
        sessions = {"model": target.session(model_path, threads=threads, interleaved=True,
                                            settings=_with_threads(settings, threads)),
                    "other": target.session(config.compare, threads=threads, interleaved=True,
                                            settings=_with_threads(other_settings, threads))}
        timings = compare_latency(sessions, {"model": feeds, "other": other_feeds}, warmup=config.warmup,
                                  rounds=max(10, config.min_runs), min_seconds=config.min_seconds,
                                  on_round=lambda done, total: step(progress, "interleaved comparison", done, total))
        result.comparison = Comparison(
            model_path, Path(config.compare), timings["model"], timings["other"], batch, threads
        )
    return result
