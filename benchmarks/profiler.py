"""Per-op profiler: how much the profiler slows a run, and how close the per-op sum comes to the
latency measured without it (the share of wall time the per-op table explains)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks._common import markdown_table, write_results
from benchmarks._models import digits_cnn, keras_cnn, minilm


def run() -> dict:
    from onnxforge.model_io import input_specs, load_model
    from onnxforge.targets.feeds import generate_feeds
    from onnxforge.targets.op_profile import OpProfileConfig, profile_ops

    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-profiler-") as tmp:
        for bench in (digits_cnn(Path(tmp)), keras_cnn(Path(tmp)), minilm(Path(tmp))):
            if bench.path is None:
                continue
            feeds = generate_feeds(input_specs(load_model(bench.path)), batch=1, overrides=bench.input_shapes)
            for threads in (1, 2):
                p = profile_ops(bench.path, feeds, OpProfileConfig(threads=threads, runs=60))
                overhead = p.profiled_latency.p50_ms / p.latency.p50_ms
                explained = p.op_sum_ms / p.latency.p50_ms
                rows.append([bench.name, threads, f"{p.latency.p50_ms:.3f}", f"{p.profiled_latency.p50_ms:.3f}",
                             f"{overhead:.2f}x", f"{p.op_sum_ms:.3f}", f"{explained:.0%}", len(p.nodes)])
                results[f"{bench.name} t{threads}"] = {
                    "plain_p50_ms": p.latency.p50_ms, "profiled_p50_ms": p.profiled_latency.p50_ms,
                    "overhead": overhead, "op_sum_ms": p.op_sum_ms, "explained": explained,
                }
    table = markdown_table(
        ["model", "threads", "p50 ms", "p50 ms profiled", "overhead", "per-op sum ms", "sum / p50", "nodes"], rows
    )
    print("### Profiler overhead and per-op agreement (batch 1)\n")
    print(table)
    print(f"\nwritten {write_results('profiler', {'results': results, 'table': table})}")
    return results
