"""Peak memory of calibration for N samples, on the demo digits CNN (dynamic batch).

For each N (256, 1024, 4096) and each data source (one ``.npz``, loaded whole; a folder of
``.npz`` files of 64 samples, streamed one file at a time), a fresh Python process loads the
model, records its RSS, then calibrates (MinMax, batches of 16, the same reader and
``collect_ranges`` that ``onnxforge quantize`` uses) and records its peak RSS during calibration. The table also
shows the ``--max-memory`` estimate (onnxforge.pipeline.quantize.calibration_memory) for the same run.

``python -m benchmarks calibration_memory``; writes benchmarks/results/calibration_memory.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

SAMPLE_COUNTS = (256, 1024, 4096)
FILE_SAMPLES = 64  # samples per file in the streamed folder

# ru_maxrss survives fork+exec on Linux (the child would report the parent's peak, here ~500 MB with
# torch loaded for the export), so the child reads VmHWM, its own high-water mark, and resets it with
# /proc/self/clear_refs after loading, to isolate calibration.
_CHILD = """
import re
from onnxruntime.quantization import CalibrationMethod
from onnxforge.model_io import input_specs, load_model
from onnxforge.pipeline.calibration import CalibrationReader, model_batch_size, open_calibration
from onnxforge.pipeline.quantize.calibration_ranges import collect_ranges

def status_kb(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1])

model = load_model({model!r})
specs = input_specs(model)
print("BASE_KB", status_kb("VmRSS"))
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
samples = open_calibration({data!r}, specs, limit={n})
reader = CalibrationReader(samples, model_batch_size(specs, preferred=16), fixed_batch=False)
batches = collect_ranges({model!r}, iter(reader.get_next, None), CalibrationMethod.MinMax, {cache!r})
print("BATCHES", batches)
print("HWM_KB", status_kb("VmHWM"))
"""


def _images(n: int) -> np.ndarray:
    from onnxforge.datasets import load_digits_split

    train = load_digits_split().train_images
    return np.ascontiguousarray(np.resize(train, (n, *train.shape[1:])))


def run(sample_counts: tuple[int, ...] = SAMPLE_COUNTS) -> dict:
    from benchmarks._common import markdown_table, peak_rss_mb, write_results
    from onnxforge.converters import ExportConfig, export
    from onnxforge.model_io import load_model
    from onnxforge.pipeline.quantize.calibration_memory import (
        BASELINE_BYTES,
        _npz_array_bytes,
        estimate_calibration_memory,
    )

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-calib-mem-") as tmp:
        tmp = Path(tmp)
        model_path = tmp / "digits_fp32.onnx"
        export("builtin:digits_cnn", model_path, ExportConfig(dynamic_batch=True))
        model = load_model(model_path)
        for n in sample_counts:
            images = _images(n)
            npz = tmp / f"calib_{n}.npz"
            np.savez(npz, image=images)
            folder = tmp / f"calib_{n}"
            folder.mkdir()
            for start in range(0, n, FILE_SAMPLES):
                np.savez(folder / f"part_{start // FILE_SAMPLES:05d}.npz", image=images[start : start + FILE_SAMPLES])
            for source, data, held in (
                ("one .npz (in memory)", npz, _npz_array_bytes(npz)),
                (f"folder, {FILE_SAMPLES}/file (streamed)", folder, _npz_array_bytes(folder / "part_00000.npz")),
            ):
                code = _CHILD.format(model=str(model_path), data=str(data), n=n, cache=str(tmp / "cache.json"))
                _, stdout = peak_rss_mb(code)
                values = {line.split()[0]: int(line.split()[1]) for line in stdout.splitlines() if line[:1].isupper()}
                base_mb, peak_mb, batches = values["BASE_KB"] / 1024, values["HWM_KB"] / 1024, values["BATCHES"]
                estimate = estimate_calibration_memory(model, held, 16)
                results.append({
                    "samples": n, "source": source, "batches": batches, "data_mb": images.nbytes / 2**20,
                    "rss_before_mb": base_mb, "peak_rss_mb": peak_mb, "calibration_mb": peak_mb - base_mb,
                    "estimate_mb": estimate.total / 2**20,
                    "estimate_above_baseline_mb": (estimate.total - BASELINE_BYTES) / 2**20,
                })

    headers = ["samples", "source", "data MB", "RSS before MB", "peak RSS MB", "peak - before MB",
               "estimate MB", "estimate - baseline MB"]
    rows = [[r["samples"], r["source"], f"{r['data_mb']:.1f}", f"{r['rss_before_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
             f"{r['calibration_mb']:.1f}", f"{r['estimate_mb']:.0f}", f"{r['estimate_above_baseline_mb']:.1f}"]
            for r in results]
    table = markdown_table(headers, rows)
    print("### Calibration peak memory: digits CNN, MinMax, batch 16 (fresh process per row)\n")
    print(table)
    path = write_results("calibration_memory", {"results": results, "table": table})
    print(f"\nwritten {path}")
    return {"results": results}


if __name__ == "__main__":
    run()
