"""`onnxforge optimize` on the demo CNN with and without the allocation and float-share knobs (issue 24):
the same search (same seed, same trial count, budget: at most 0.5 accuracy points lost), once with
``prune_channels.allocation``, ``prune_channels.depth_scales`` and ``quantize.float_share`` pinned to
their plain values and once free; both chosen models re-timed interleaved with fp32 in one run at
batch 1, 1 thread."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import markdown_table, write_results
from benchmarks.optimize import MAX_DROP, _accuracy, _data

TRIALS = 20
PLAIN = {"prune_channels.allocation": ("uniform",), "prune_channels.depth_scales": ((),),
         "quantize.float_share": (0.0,)}


def _search(folder: Path, name: str, calib: Path, evaluation: Path, space: dict, trials: int):
    from onnxforge.pipeline.cache import StageCache
    from onnxforge.pipeline.data_spec import DataSpec
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.search import OptimizeConfig, optimize

    config = OptimizeConfig(calibration=DataSpec(path=calib), eval_data=DataSpec(path=evaluation),
                            metric=Metric.ACCURACY, tolerance=MAX_DROP, trials=trials, seed=0, space=space,
                            input_shapes={"image": (1, 1, 32, 32)})
    start = time.perf_counter()
    result = optimize("builtin:digits_cnn", folder / name, config, cache=StageCache(folder / f"cache-{name}"))
    return result, time.perf_counter() - start


def run(trials: int = TRIALS) -> dict:
    from onnxforge.targets import get_target
    from onnxforge.targets.feeds import batch_from_samples
    from onnxforge.targets.latency import compare_latency

    with tempfile.TemporaryDirectory(prefix="bench-optimize-knobs-") as tmp:
        folder = Path(tmp)
        calib, evaluation = _data(folder)
        searches = {name: _search(folder, name, calib, evaluation, space, trials)
                    for name, space in (("without the new knobs", PLAIN), ("with them", {}))}
        reference = Path(searches["with them"][0].run_dir) / "input_export.onnx"
        contenders = {"fp32 (exported)": reference} | {
            name: Path(result.run_dir) / "best.onnx" for name, (result, _) in searches.items()}
        with np.load(evaluation) as data:
            feeds = batch_from_samples({"image": data["image"]}, 1)
        target = get_target("cpu")
        sessions = {name: target.session(str(path), threads=1) for name, path in contenders.items()}
        timings = compare_latency(sessions, feeds, rounds=60)
        base = timings["fp32 (exported)"].p50_ms
        rows, results = [], {}
        for name, path in contenders.items():
            search = searches.get(name)
            best = search[0].best if search else None
            acc = _accuracy(path, evaluation)
            speedup = base / timings[name].p50_ms
            rows.append([name, best["describe"] if best else "-", f"{best['speedup']:.2f}x" if best else "-",
                         f"{speedup:.2f}x", f"{acc * 100:.2f}%", f"{search[1]:.0f}" if search else "-"])
            results[name] = {"chosen": best["describe"] if best else None, "search_speedup": best["speedup"]
                             if best else None, "retimed_speedup": speedup, "accuracy": acc,
                             "seconds": search[1] if search else None}
    table = markdown_table(["search", "chosen", "speedup (search)", "speedup (re-timed)", "accuracy", "s"], rows)
    text = f"{table}\n\n{trials} trials each, seed 0, max drop {MAX_DROP} accuracy points."
    print("### optimize on the demo CNN, with and without the allocation knobs\n")
    print(text)
    print(f"\nwritten {write_results('optimize_knobs', {'results': results, 'table': text})}")
    return results


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else TRIALS)
