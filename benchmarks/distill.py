"""Recovery by distillation: the demo digits CNN at 75% channels, repaired by least squares only vs
trained against the fp32 teacher, alone and with INT8 on top.

The teacher is ``builtin:digits_cnn``; training data = the digits training split (with labels, 1347
images; 10% held out for early stopping), accuracy on the held-out test split (450 images) that
neither pruning nor training sees. Training time is wall-clock on this machine's cores. Speedups are
fp32 p50 / model p50 at batch 1, 1 thread, every model timed interleaved in one loop. INT8 is
onnxforge's static QDQ U8S8 per-channel on 256 training images. Goals (issue 15): distilled within 0.3
points of fp32; distilled + INT8 >= 12x fp32.

``python -m benchmarks distill`` (or ``python benchmarks/distill.py``); ``--ratio``, ``--epochs``
and ``--lr`` change what is measured.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def run(ratio: float = 0.75, epochs: int = 60, lr: float = 2e-3, rounds: int = 40) -> dict:
    from benchmarks._common import demo_model, markdown_table, write_results
    from onnxforge.converters.distill import DistillConfig, distill
    from onnxforge.datasets import load_digits_split
    from onnxforge.model_io import input_specs, load_model
    from onnxforge.pipeline.calibration import load_samples
    from onnxforge.pipeline.evaluate import Metric, run_outputs, score
    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Repair, prune_channels
    from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize
    from onnxforge.targets import CpuTarget
    from onnxforge.targets.feeds import batch_from_samples
    from onnxforge.targets.latency import compare_latency

    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        tmp = Path(tmp)
        fp32, calib, evaluation = demo_model(tmp)
        split = load_digits_split()
        train = tmp / "train.npz"
        np.savez(train, image=split.train_images, label=split.train_labels)
        pruned = prune_channels(fp32, tmp / "repaired.onnx", ChannelPruneConfig(
            ratio=ratio, repair=Repair.LEAST_SQUARES, calibration_data=calib))
        started = time.perf_counter()
        result = distill("builtin:digits_cnn", tmp / "repaired.onnx", tmp / "distilled.onnx", DistillConfig(
            epochs=epochs, learning_rate=lr, calibration_data=train, eval_data=evaluation, tolerance=100.0),
            progress=lambda event: print(event.describe(), flush=True) if event.phase == "epoch" else None)
        wall = time.perf_counter() - started
        paths = {"fp32": fp32, f"repair only ({ratio:.0%} channels)": tmp / "repaired.onnx",
                 f"distilled ({ratio:.0%} channels)": tmp / "distilled.onnx"}
        scheme = parse_scheme("qdq-u8s8-per-channel")
        for name in list(paths)[1:]:
            out = tmp / f"{len(paths)}.int8.onnx"
            quantize(paths[name], out, calib, QuantizeConfig(schemes=(scheme,), tolerance=100.0, mixed_precision=False,
                                                                error_report=False))
            paths[f"{name} + INT8"] = out
        target = CpuTarget()
        samples = load_samples(evaluation, input_specs(load_model(fp32)))
        for name, path in paths.items():
            outputs = run_outputs(target.session(path), samples, 64)
            info[name] = {"accuracy": score(Metric.ACCURACY, outputs, outputs, samples.labels)}
        sessions = {name: target.session(path, threads=1) for name, path in paths.items()}
        stats = compare_latency(sessions, batch_from_samples(samples.inputs, 1), rounds=rounds)
        for name in paths:
            info[name].update(speedup_b1=stats["fp32"].p50_ms / stats[name].p50_ms, p50_ms_b1=stats[name].p50_ms)
    fp32_accuracy = info["fp32"]["accuracy"]
    headers = ["model", "accuracy", "vs fp32 (points)", "speedup b1 (1 thread)", "p50 ms"]
    rows = [[name, f"{v['accuracy'] * 100:.2f}%", f"{(v['accuracy'] - fp32_accuracy) * 100:+.2f}",
             f"{v['speedup_b1']:.2f}x", f"{v['p50_ms_b1']:.3f}"] for name, v in info.items()]
    table = markdown_table(headers, rows)
    training = (
        f"training: {result.epochs_run} epochs ({result.stopped}; best epoch {result.best_epoch}), "
        f"{result.train_seconds:.0f} s on {__import__('os').cpu_count()} cores ({wall:.0f} s with mapping, "
        f"export and gate); student = pruned graph before training: max err "
        f"{result.parity_before['max_abs_error']:.1e}; exported vs trained: {result.parity_after['max_abs_error']:.1e}"
    )
    print(f"### Distillation: demo digits CNN at {ratio:.0%} channels\n")
    print(table)
    print("\n" + training)
    payload = {"ratio": ratio, "epochs": epochs, "learning_rate": lr, "results": info, "distill": result.to_json(),
               "prune": {"macs_ratio": pruned.macs_before / pruned.macs_after}, "table": table + "\n\n" + training}
    path = write_results("distill", payload)
    print(f"\nwritten {path}")
    return info


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    run(args.ratio, args.epochs, args.lr, args.rounds)
