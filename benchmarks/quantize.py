"""Quantization: ORT quantize_static defaults vs the best hand-picked ORT configuration vs onnxforge's default.

For each: accuracy on the held-out digits (labels), speedup vs fp32 at batch 1 and 32 with 1 and 2
threads (all models timed interleaved in one loop per setting), size, wall time and peak memory of
the quantization itself (each run in its own process).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks._common import demo_model, markdown_table, peak_rss_mb, write_results

_ORT_RUN = """
import time, onnxruntime.quantization as q, numpy as np
class R(q.CalibrationDataReader):
    def __init__(self):
        d = np.load({calib!r})["image"]; self.it = iter([{{"image": d[i:i+16]}} for i in range(0, len(d), 16)])
    def get_next(self): return next(self.it, None)
t = time.perf_counter()
q.quant_pre_process({src!r}, {pre!r})
q.quantize_static({pre!r}, {dst!r}, R(), {kwargs})
print('SECONDS', time.perf_counter() - t)
"""

_FORGE_RUN = """
import time
from pathlib import Path
from onnxforge.pipeline.quantize import quantize, QuantizeConfig
t = time.perf_counter()
r = quantize({src!r}, {dst!r}, {calib!r}, QuantizeConfig(eval_data=Path({evaluation!r})))
print('SECONDS', time.perf_counter() - t)
print('CHOSEN', r.chosen)
"""


def _seconds(stdout: str) -> float:
    return float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("SECONDS")))


def run() -> dict:
    from onnxforge.model_io import input_specs, load_model
    from onnxforge.pipeline.calibration import load_samples
    from onnxforge.pipeline.evaluate import Metric, run_outputs, score
    from onnxforge.targets import CpuTarget
    from onnxforge.targets.feeds import batch_from_samples
    from onnxforge.targets.latency import compare_latency

    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        tmp = Path(tmp)
        fp32, calib, evaluation = demo_model(tmp)
        variants = {
            "ORT quantize_static defaults (QDQ S8S8 per-tensor)": "",
            "ORT hand-picked (QDQ U8S8 per-channel)": (
                "activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, per_channel=True"
            ),
        }
        paths = {"fp32": fp32}
        info = {"fp32": {"seconds": 0.0, "peak_rss_mb": None}}
        for i, (name, kwargs) in enumerate(variants.items()):
            dst = tmp / f"ort_{i}.onnx"
            code = _ORT_RUN.format(
                calib=str(calib), src=str(fp32), pre=str(tmp / f"pre_{i}.onnx"), dst=str(dst), kwargs=kwargs
            )
            peak, stdout = peak_rss_mb(code)
            paths[name] = dst
            info[name] = {"seconds": _seconds(stdout), "peak_rss_mb": peak}
        dst = tmp / "forge.onnx"
        peak, stdout = peak_rss_mb(
            _FORGE_RUN.format(src=str(fp32), dst=str(dst), calib=str(calib), evaluation=str(evaluation))
        )
        chosen = next(line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith("CHOSEN"))
        forge_name = f"onnxforge default (chose {chosen})"
        paths[forge_name] = dst
        info[forge_name] = {"seconds": _seconds(stdout), "peak_rss_mb": peak}

        target = CpuTarget()
        samples = load_samples(evaluation, input_specs(load_model(fp32)))
        for name, path in paths.items():
            outputs = run_outputs(target.session(path), samples, 64)
            info[name]["accuracy"] = score(Metric.ACCURACY, outputs, outputs, samples.labels)
            info[name]["bytes"] = path.stat().st_size
        for batch in (1, 32):
            feeds = batch_from_samples(samples.inputs, batch)
            for threads in (1, 2):
                sessions = {name: target.session(path, threads=threads) for name, path in paths.items()}
                stats = compare_latency(sessions, feeds, rounds=30 if batch == 1 else 10)
                for name in paths:
                    info[name][f"speedup_b{batch}_t{threads}"] = stats["fp32"].p50_ms / stats[name].p50_ms
                    info[name][f"p50_ms_b{batch}_t{threads}"] = stats[name].p50_ms

    headers = ["approach", "accuracy", "x b1 t1", "x b1 t2", "x b32 t1", "x b32 t2", "size KB", "time s", "peak MB"]
    rows = [
        [
            name,
            f"{v['accuracy'] * 100:.2f}%",
            *(f"{v[f'speedup_b{b}_t{t}']:.2f}" for b in (1, 32) for t in (1, 2)),
            f"{v['bytes'] / 1024:.0f}",
            f"{v['seconds']:.1f}",
            f"{v['peak_rss_mb']:.0f}" if v["peak_rss_mb"] else "-",
        ]
        for name, v in info.items()
    ]
    table = markdown_table(headers, rows)
    print("### Quantization: demo digits CNN (speedup = fp32 p50 / model p50, interleaved)\n")
    print(table)
    path = write_results("quantize", {"results": info, "table": table})
    print(f"\nwritten {path}")
    return info
