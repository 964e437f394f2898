"""The whole pipeline on the demo (export -> simplify -> prune_channels -> quantize): wall time per
stage and the per-stage table (size, held-out accuracy, latency p50 at batch 1, speedup)."""

from __future__ import annotations

import tempfile

from benchmarks._common import markdown_table, write_results


def run() -> dict:
    from onnxforge.demo import demo

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        result = demo(tmp, force=True)
        rows, stages = [], {}
        for s in result.stages:
            m = s.metrics
            rows.append([s.name, f"{s.seconds:.1f}", f"{m['bytes'] / 1024:.0f}", f"{m['accuracy'] * 100:.2f}%",
                         f"{m['latency_p50_ms']:.3f}", f"{m['speedup_vs_first']:.2f}x"])
            stages[s.name] = {"seconds": s.seconds, **{k: v for k, v in m.items() if k != "latency"}}
    table = markdown_table(["stage", "wall s", "size KB", "accuracy", "p50 ms (b=1, 1 thread)", "speedup"], rows)
    print("### Whole pipeline: `onnxforge demo` (digits CNN, 450 held-out images)\n")
    print(table)
    print(f"\nwritten {write_results('pipeline', {'results': stages, 'table': table})}")
    return stages
