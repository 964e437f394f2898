"""Per-op profile from onnxruntime's own profiler, and how well it accounts for the real latency.

Two sessions of the same model on the same target run in alternating blocks (A B A B): a
plain one (its wall time is the latency a user sees) and one with ``enable_profiling``. The
profiler writes a JSON list of events; those with ``cat == "Node"`` and a name ending in
``_kernel_time`` are kernel executions with ``dur`` in microseconds and ``args.op_name`` /
``args.provider``. Each ``model_run`` session event brackets one ``run()``; node events inside
the first ``warmup`` brackets are dropped.

Reported per node and per op type: median time per run (medians resist this shared machine's
hiccups) and share of their sum; per provider:
how many nodes and how much time it took (the EP placement), and which nodes ran on a provider
other than the target's first one (a fall back). ``coverage`` = per-op sum / onnxruntime's own run
time, both from the same profiled runs: the rest is the executor's overhead (input/output copies,
allocation). It is not taken against the plain session's latency: the profiler slows every kernel
(several times over on a tiny model, ``profiler_overhead``), so the kernel times of the profiled
runs can add up to more than a plain run lasts. Node names are those of the graph after
onnxruntime's optimizations, so fused nodes (``..._nchwc``, ``FusedConv``) appear under new names.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.errors import UsageError
from onnxforge.pipeline.codec import JsonResult
from onnxforge.targets import get_target
from onnxforge.targets.base import Target
from onnxforge.targets.latency import LatencyStats

__all__ = ["NodeTime", "OpProfile", "OpProfileConfig", "OpTypeTime", "ProviderShare", "parse_profile", "profile_ops"]

_KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True, kw_only=True)
class OpProfileConfig:
    target: str | Target = "cpu"
    threads: int | None = None
    warmup: int = 5
    runs: int = 50


@dataclass(frozen=True)
class NodeTime(JsonResult):
    """One node of the optimized graph: median kernel time per run (µs) and its share of the per-op sum."""

    name: str
    op_type: str
    provider: str
    median_us: float
    share: float
    output_shapes: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class OpTypeTime(JsonResult):
    op_type: str
    nodes: int
    median_us: float
    share: float


@dataclass(frozen=True)
class ProviderShare(JsonResult):
    """EP placement: the nodes one provider ran and its share of the per-op time."""

    provider: str
    nodes: int
    median_us: float
    share: float


@dataclass
class OpProfile(JsonResult):
    target: str
    expected_provider: str
    nodes: list[NodeTime]
    op_types: list[OpTypeTime]
    placement: list[ProviderShare]
    latency: LatencyStats  # the plain session, wall time per run()
    profiled_latency: LatencyStats  # the profiling session, wall time per run()
    op_sum_ms: float  # median over profiled runs of the summed kernel times
    ort_run_ms: float  # median of onnxruntime's own model_run durations
    runs: int
    notes: list[str] = field(default_factory=list)

    @property
    def fallback_nodes(self) -> list[NodeTime]:
        """Nodes that ran on another provider than the target's first (e.g. on the CPU under CUDA)."""
        return [n for n in self.nodes if n.provider != self.expected_provider]

    @property
    def coverage(self) -> float:
        """Per-op sum over onnxruntime's own run time, both medians of the same profiled runs (at most
        1 with the sequential executor)."""
        return self.op_sum_ms / self.ort_run_ms if self.ort_run_ms > 0 else 0.0

    @property
    def profiler_overhead(self) -> float:
        """Profiled p50 over plain p50 (1.10 = the profiler made each run 10% slower)."""
        return self.profiled_latency.p50_ms / self.latency.p50_ms if self.latency.p50_ms > 0 else 0.0

    def json_extra(self) -> dict[str, Any]:
        return {"coverage": self.coverage, "profiler_overhead": self.profiler_overhead,
                "fallback_nodes": [n.name for n in self.fallback_nodes]}


@dataclass(frozen=True)
class _ParsedProfile:
    per_node_us: dict[str, float]  # median over kept runs of the node's summed kernel time
    node_info: dict[str, tuple[str, str, tuple[tuple[int, ...], ...]]]  # name -> (op, provider, shapes)
    run_sums_us: list[float]
    run_durations_us: list[float]


def _shapes(entries) -> tuple[tuple[int, ...], ...]:
    shapes = []
    for entry in entries or ():
        for dims in (entry or {}).values():
            if isinstance(dims, list):
                shapes.append(tuple(int(d) for d in dims))
    return tuple(shapes)


def parse_profile(events: list[dict], *, skip_runs: int = 0) -> _ParsedProfile:
    """Kernel times per node from onnxruntime profiler events, dropping the first ``skip_runs`` runs.

    A control-flow node (If, Loop, Scan) gets its own time only: the kernels of its body run inside
    its kernel event and are profiled themselves, so their time is taken out of the parent's (summing
    both counted the body twice: silero-vad's per-op sum came to 9x its run time)."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    kept = runs[skip_runs:]
    if not kept:
        raise UsageError("the profile holds no measured runs (every run was a warm-up)")
    kernels = sorted(
        (e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith(_KERNEL_SUFFIX)),
        key=lambda e: e["ts"],
    )
    per_run: list[dict[str, float]] = []
    info: dict[str, tuple[str, str, tuple[tuple[int, ...], ...]]] = {}
    run_sums = []
    k = 0
    for run in runs[:skip_runs]:  # skip warm-up kernels
        end = run["ts"] + run["dur"]
        while k < len(kernels) and kernels[k]["ts"] <= end:
            k += 1
    for run in kept:
        start, end = run["ts"], run["ts"] + run["dur"]
        node_us: dict[str, float] = {}
        open_kernels: list[tuple[str, float]] = []  # (node, end ts) of the kernels whose subgraph runs now
        while k < len(kernels) and kernels[k]["ts"] <= end:
            event = kernels[k]
            k += 1
            if event["ts"] < start:
                continue
            name = event["name"][: -len(_KERNEL_SUFFIX)]
            args = event.get("args", {})
            dur = float(event["dur"])
            ts = float(event["ts"])
            while open_kernels and ts >= open_kernels[-1][1]:
                open_kernels.pop()
            if open_kernels and ts + dur <= open_kernels[-1][1]:
                # inside an If/Loop/Scan body: the parent's kernel time includes it; count it once
                parent = open_kernels[-1][0]
                node_us[parent] = node_us.get(parent, 0.0) - dur
            open_kernels.append((name, ts + dur))
            node_us[name] = node_us.get(name, 0.0) + dur
            info.setdefault(
                name,
                (str(args.get("op_name", "?")), str(args.get("provider", "?")), _shapes(args.get("output_type_shape"))),
            )
        run_sums.append(sum(node_us.values()))
        per_run.append(node_us)
    return _ParsedProfile(
        per_node_us={name: float(np.median([run.get(name, 0.0) for run in per_run])) for name in info},
        node_info=info,
        run_sums_us=run_sums,
        run_durations_us=[float(r["dur"]) for r in kept],
    )


def _time_run(session, feeds: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, dict(feeds))
    return time.perf_counter() - start


def profile_ops(
    model_path: str | os.PathLike, feeds: Mapping[str, np.ndarray], config: OpProfileConfig = OpProfileConfig()
) -> OpProfile:
    """Profile ``model_path`` on ``config.target`` with ``feeds``; see the module docstring for what is measured."""
    if config.runs < 1 or config.warmup < 0:
        raise UsageError("per-op profile: runs must be at least 1 and warm-up at least 0")
    target = get_target(config.target)
    plain = target.session(model_path, threads=config.threads)
    with tempfile.TemporaryDirectory(prefix="onnxforge-profile-") as tmp:
        profiled = target.session(model_path, threads=config.threads, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(config.warmup):
            plain.run(None, dict(feeds))
            profiled.run(None, dict(feeds))
        plain_times: list[float] = []
        profiled_times: list[float] = []
        # Blocks, alternating A B A B: drift on a shared machine hits both alike, while run-by-run
        # alternation would let one session's spinning intra-op threads slow the other.
        halves = (config.runs - config.runs // 2, config.runs // 2)
        for block in halves:
            plain_times += [_time_run(plain, feeds) for _ in range(block)]
            profiled_times += [_time_run(profiled, feeds) for _ in range(block)]
        profile_file = profiled.end_profiling()
        events = json.loads(Path(profile_file).read_text())
    parsed = parse_profile(events, skip_runs=config.warmup)
    return _summarize(target, parsed, plain_times, profiled_times, feeds, config)


def _summarize(target, parsed: _ParsedProfile, plain_times, profiled_times, feeds, config) -> OpProfile:
    total_us = sum(parsed.per_node_us.values()) or 1.0
    nodes = sorted(
        (
            NodeTime(name, op, provider, us, us / total_us, shapes)
            for name, us in parsed.per_node_us.items()
            for op, provider, shapes in [parsed.node_info[name]]
        ),
        key=lambda n: n.median_us,
        reverse=True,
    )
    by_op: dict[str, list[NodeTime]] = {}
    by_provider: dict[str, list[NodeTime]] = {}
    for node in nodes:
        by_op.setdefault(node.op_type, []).append(node)
        by_provider.setdefault(node.provider, []).append(node)
    op_types = sorted(
        (
            OpTypeTime(op, len(ns), sum(n.median_us for n in ns), sum(n.median_us for n in ns) / total_us)
            for op, ns in by_op.items()
        ),
        key=lambda o: o.median_us,
        reverse=True,
    )
    placement = sorted(
        (
            ProviderShare(p, len(ns), sum(n.median_us for n in ns), sum(n.median_us for n in ns) / total_us)
            for p, ns in by_provider.items()
        ),
        key=lambda p: p.median_us,
        reverse=True,
    )
    batch = next((int(a.shape[0]) for a in feeds.values() if a.ndim), 1)
    expected = target.provider_options()[0][0]
    notes = []
    fallback = [n for n in nodes if n.provider != expected]
    if fallback:
        notes.append(
            f"{len(fallback)} of {len(nodes)} nodes ran outside {expected} "
            f"({sum(n.share for n in fallback):.0%} of kernel time): " + ", ".join(n.name for n in fallback[:5])
            + (" ..." if len(fallback) > 5 else "")
        )
    return OpProfile(
        target=target.name,
        expected_provider=expected,
        nodes=nodes,
        op_types=op_types,
        placement=placement,
        latency=LatencyStats.from_times(plain_times, batch),
        profiled_latency=LatencyStats.from_times(profiled_times, batch),
        op_sum_ms=float(np.median(parsed.run_sums_us)) / 1000.0,
        ort_run_ms=float(np.median(parsed.run_durations_us)) / 1000.0,
        runs=len(parsed.run_sums_us),
        notes=notes,
    )
