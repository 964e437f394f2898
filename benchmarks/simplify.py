"""Simplification: onnxsim vs onnxslim vs onnxruntime's offline optimization vs onnxforge (which runs
all three, checks each for parity against the input, and keeps the smallest graph that passes —
or the input when none is smaller). Node count (subgraphs included), file size, time, parity.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks._common import markdown_table, write_results
from benchmarks._models import all_models


def run() -> dict:
    from onnxforge.model_io import load_model
    from onnxforge.pipeline.simplify import SimplifyConfig, simplify_model

    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-simplify-") as tmp:
        for bench in all_models(Path(tmp)):
            if bench.path is None:
                rows.append([bench.name, "skipped", "", "", "", bench.skipped])
                results[bench.name] = {"skipped": bench.skipped}
                continue
            model = load_model(bench.path)
            result = simplify_model(model, SimplifyConfig(input_shapes=bench.input_shapes), feeds=bench.feeds)
            size = model.ByteSize()
            rows.append([bench.name, "input", result.nodes_before, f"{size / 1024:.0f}", "", ""])
            for c in result.candidates:
                parity = c.error or ("ok" if c.usable else f"FAILED (max abs {c.parity.max_abs:.2g})")
                rows.append(["", c.method, c.nodes if c.nodes is not None else "-",
                             f"{c.bytes / 1024:.0f}" if c.bytes else "-", f"{c.seconds:.2f}", parity[:70]])
            total = sum(c.seconds for c in result.candidates)
            rows.append(["", f"**onnxforge** (kept {result.chosen})", result.nodes_after,
                         f"{result.model.ByteSize() / 1024:.0f}", f"{total:.2f}", "ok (checked)"])
            results[bench.name] = {**result.to_json(), "input_bytes": size, "seconds_total": total}
    table = markdown_table(["model", "simplifier", "nodes", "size KB", "time s", "parity"], rows)
    print("### Simplification (node counts include If/Loop subgraphs)\n")
    print(table)
    print(f"\nwritten {write_results('simplify', {'results': results, 'table': table})}")
    return results
