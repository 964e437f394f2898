"""Structured channel pruning of the demo digits CNN: what Torch-Pruning reports vs what users feel.

For each ratio R (fraction of channels removed in every prunable group): held-out accuracy without
and with the least-squares repair, parameters and MACs ratio (original / pruned), and measured
speedup vs fp32 (p50 latency ratio) at batch 1 and 32, all models timed interleaved in one loop per
batch size; the R=0.5 model is also quantized (onnxforge's static INT8) to show that the two compose.
Goals (issue 5): R=0.5 with repair >= 1.7x faster at batch 1 and 32 with accuracy >= 98.0%; pruned +
INT8 >= 5x faster than fp32.

``python -m benchmarks prune_channels`` (or ``python benchmarks/prune_channels.py``); ``--ratios``
and ``--threads`` change what is measured.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

DEFAULT_RATIOS = (0.25, 0.5, 0.625)


def run(
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    threads: int | None = None,
    rounds: int = 30,
    int8_ratio: float | None = 0.5,
) -> dict:
    from benchmarks._common import demo_model, markdown_table, write_results
    from onnxforge.model_cost import count_params_and_macs
    from onnxforge.model_io import input_specs, load_model
    from onnxforge.pipeline.calibration import load_samples
    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Repair, prune_channels
    from onnxforge.targets import CpuTarget
    from onnxforge.targets.feeds import batch_from_samples
    from onnxforge.targets.latency import compare_latency

    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        tmp = Path(tmp)
        fp32, calib, evaluation = demo_model(tmp)
        params0, macs0 = count_params_and_macs(load_model(fp32))
        paths = {"fp32": fp32}
        info["fp32"] = {"params_ratio": 1.0, "macs_ratio": 1.0}
        for ratio in ratios:
            name = f"channels {ratio:g}"
            # tolerance 100 points: measure this exact ratio (the gate would otherwise back off)
            result = prune_channels(fp32, tmp / f"c{ratio}.onnx", ChannelPruneConfig(
                ratio=ratio, repair=Repair.LEAST_SQUARES, calibration_data=calib, eval_data=evaluation,
                tolerance=100.0))
            info["fp32"]["accuracy"] = result.score_before
            info[name] = {
                "accuracy_without_repair": result.score_without_repair,
                "accuracy": result.score_after,
                "params_ratio": result.params_before / result.params_after,
                "macs_ratio": result.macs_before / result.macs_after,
                "params": result.params_after,
                "macs": result.macs_after,
            }
            paths[name] = result.path
        info["fp32"].update(params=params0, macs=macs0)
        if int8_ratio in ratios:
            # composes with quantization: prune, then onnxforge's default static INT8 (its own accuracy gate)
            from onnxforge.pipeline.quantize import QuantizeConfig, quantize

            source = f"channels {int8_ratio:g}"
            quantized = quantize(paths[source], tmp / "int8.onnx", calib, QuantizeConfig(eval_data=evaluation))
            name = f"{source} + INT8 ({quantized.chosen})"
            info[name] = {**info[source], "accuracy_without_repair": None,
                          "accuracy": quantized.chosen_candidate.score}
            paths[name] = tmp / "int8.onnx"

        target = CpuTarget()
        samples = load_samples(evaluation, input_specs(load_model(fp32)))
        for batch in (1, 32):
            feeds = batch_from_samples(samples.inputs, batch)
            sessions = {name: target.session(path, threads=threads) for name, path in paths.items()}
            stats = compare_latency(sessions, feeds, rounds=rounds if batch == 1 else max(5, rounds // 3))
            for name in paths:
                info[name][f"speedup_b{batch}"] = stats["fp32"].p50_ms / stats[name].p50_ms
                info[name][f"p50_ms_b{batch}"] = stats[name].p50_ms

    headers = ["model", "acc no repair", "accuracy", "params x", "MACs x", "speedup b1", "speedup b32",
               "p50 ms b1", "p50 ms b32"]
    rows = []
    for name, v in info.items():
        no_repair = v.get("accuracy_without_repair")
        rows.append([
            name,
            "-" if no_repair is None else f"{no_repair * 100:.2f}%",
            f"{v['accuracy'] * 100:.2f}%",
            f"{v['params_ratio']:.2f}",
            f"{v['macs_ratio']:.2f}",
            f"{v['speedup_b1']:.2f}",
            f"{v['speedup_b32']:.2f}",
            f"{v['p50_ms_b1']:.3f}",
            f"{v['p50_ms_b32']:.3f}",
        ])
    table = markdown_table(headers, rows)
    print("### Channel pruning: demo digits CNN (speedup = fp32 p50 / model p50, interleaved, "
          f"threads={threads or 'default'})\n")
    print(table)
    payload = {"ratios": list(ratios), "threads": threads, "results": info, "table": table}
    path = write_results("prune_channels", payload)
    print(f"\nwritten {path}")
    return info


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--int8-ratio", type=float, default=0.5, help="also quantize the model pruned at this ratio")
    args = parser.parse_args()
    run(tuple(args.ratios), args.threads, args.rounds, args.int8_ratio)
