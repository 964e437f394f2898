"""`onnxforge optimize` on the demo CNN (digits, 450 held-out images, budget: at most 0.5 accuracy points
lost): 24 trials locally and the same search on a local 2-worker Ray cluster; the chosen model against
the best single stage and the hand-picked combination (50% channels + int8, the demo's recipe), all
timed interleaved with fp32 in one run at batch 1, 1 thread."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import markdown_table, write_results

TRIALS = 24
MAX_DROP = 0.5


def _data(folder: Path) -> tuple[Path, Path]:
    from onnxforge.datasets import DIGITS_INPUT_NAME, load_digits_split

    split = load_digits_split()
    calib, evaluation = folder / "calib.npz", folder / "eval.npz"
    np.savez(calib, **{DIGITS_INPUT_NAME: split.train_images[:256]})
    np.savez(evaluation, **{DIGITS_INPUT_NAME: split.test_images, "label": split.test_labels})
    return calib, evaluation


def _search(folder: Path, name: str, calib: Path, evaluation: Path, ray_address: str | None):
    from onnxforge.pipeline.cache import StageCache
    from onnxforge.pipeline.data_spec import DataSpec
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.search import OptimizeConfig, optimize

    config = OptimizeConfig(calibration=DataSpec(path=calib), eval_data=DataSpec(path=evaluation),
                            metric=Metric.ACCURACY, tolerance=MAX_DROP, trials=TRIALS,
                            input_shapes={"image": (1, 1, 32, 32)}, ray_address=ray_address)
    start = time.perf_counter()
    result = optimize("builtin:digits_cnn", folder / name, config, cache=StageCache(folder / f"cache-{name}"))
    return result, time.perf_counter() - start


def _hand_picked(folder: Path, start_model: str, calib: Path) -> Path:
    """The demo's combination: 50% channels (least-squares repair) + QDQ U8S8 per-channel."""
    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, prune_channels
    from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize

    pruned = folder / "hand_pruned.onnx"
    prune_channels(start_model, pruned, ChannelPruneConfig(ratio=0.5, calibration_data=calib))
    out = folder / "hand_picked.onnx"
    quantize(pruned, out, calib, QuantizeConfig(schemes=(parse_scheme("qdq-u8s8-per-channel"),), mixed_precision=False,
                                                error_report=False))
    return out


def _accuracy(model: Path, evaluation: Path) -> float:
    from onnxforge.model_io import input_specs, load_model
    from onnxforge.pipeline.calibration import load_samples
    from onnxforge.pipeline.evaluate import Metric, run_outputs, score
    from onnxforge.targets import get_target

    samples = load_samples(evaluation, input_specs(load_model(model)))
    outputs = run_outputs(get_target("cpu").session(str(model)), samples, 64)
    return score(Metric.ACCURACY, outputs, outputs, samples.labels)


def run() -> dict:
    from onnxforge.targets import get_target
    from onnxforge.targets.latency import compare_latency

    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        folder = Path(tmp)
        calib, evaluation = _data(folder)
        local, local_s = _search(folder, "local", calib, evaluation, None)
        distributed, ray_s = _search(folder, "ray", calib, evaluation, "local")
        reference = Path(local.run_dir) / "input_export.onnx"
        single = [r for r in local.trials if r["status"] == "ok" and r["within_budget"]
                  and sum(v != "none" for k, v in r["plan"].items() if "." not in k) == 1]
        best_single = max(single, key=lambda r: r["speedup"])
        contenders = {
            "fp32 (exported)": reference,
            "hand-picked: 50% channels + QDQ U8S8 per-channel": _hand_picked(
                folder, str(Path(local.run_dir) / "input_simplified.onnx"), calib
            ),
            f"optimize (local) chose: {local.best['describe']}": Path(local.run_dir) / "best.onnx",
            f"optimize (Ray) chose: {distributed.best['describe']}": Path(distributed.run_dir) / "best.onnx",
        }
        # the best single stage's file went with the non-front trials: rebuild it (every stage is cached)
        from onnxforge.model_io import file_sha256
        from onnxforge.pipeline.data_spec import DataSpec
        from onnxforge.pipeline.search.space import SearchSpace
        from onnxforge.pipeline.search.trial import TrialContext, build_trial

        start = str(Path(local.run_dir) / "input_simplified.onnx")
        ctx = TrialContext(start_model=start, start_sha256=file_sha256(start), reference_model=str(reference),
                           calibration=DataSpec(path=calib), eval_path=str(evaluation), target="cpu", gate=None,
                           reference_score=0.0, batch=1, threads=1, rounds=20, cache_root=str(folder / "cache-local"))
        work = folder / "single"
        work.mkdir()
        built = build_trial(SearchSpace("cpu").plan_from_params(best_single["plan"]), ctx, work)
        contenders[f"best single stage: {best_single['describe']}"] = built.path
        contenders = dict(sorted(contenders.items(), key=lambda kv: not kv[0].startswith("fp32")))
        target = get_target("cpu")
        from onnxforge.targets.feeds import batch_from_samples

        with np.load(evaluation) as data:
            feeds = batch_from_samples({"image": data["image"]}, 1)
        sessions = {name: target.session(str(path), threads=1) for name, path in contenders.items()}
        timings = compare_latency(sessions, feeds, rounds=60)
        base = timings["fp32 (exported)"].p50_ms
        rows = []
        results = {}
        for name, path in contenders.items():
            acc = _accuracy(path, evaluation)
            speedup = base / timings[name].p50_ms
            rows.append([name, f"{acc * 100:.2f}%", f"{timings[name].p50_ms:.3f}", f"{speedup:.2f}x",
                         f"{path.stat().st_size / 1024:.0f}"])
            results[name] = {"accuracy": acc, "p50_ms": timings[name].p50_ms, "speedup": speedup,
                             "bytes": path.stat().st_size}
        front_rows = [[str(r["number"]), r["describe"], f"{r['quality'] * 100:.2f}%", f"{r['speedup']:.2f}x",
                       f"{r['bytes'] / 1024:.0f}", "chosen" if r["number"] == local.best["number"] else
                       ("yes" if r["within_budget"] else "no")] for r in local.front]
        same = local.best["describe"] == distributed.best["describe"]
        summary = (f"{TRIALS} trials: local {local_s:.0f} s, Ray (local 2-CPU instance) {ray_s:.0f} s; "
                   f"failed trials: {sum(r['status'] != 'ok' for r in local.trials)} local, "
                   f"{sum(r['status'] != 'ok' for r in distributed.trials)} Ray; the two chose "
                   + ("the same configuration" if same else "different configurations")
                   + f" (local front: {len(local.front)} models, Ray front: {len(distributed.front)}).")
    table = markdown_table(["model", "accuracy", "p50 ms", "speedup vs fp32", "size KB"], rows)
    front_table = markdown_table(
        ["trial", "chain", "accuracy", "speedup (re-timed)", "size KB", "in budget"], front_rows
    )
    text = f"{table}\n\nThe local front:\n\n{front_table}\n\n{summary}"
    print("### optimize on the demo CNN\n")
    print(text)
    payload = {"results": results, "local_seconds": local_s, "ray_seconds": ray_s, "same_choice": same,
               "local_front": local.front, "ray_front": distributed.front, "table": text}
    print(f"\nwritten {write_results('optimize', payload)}")
    return results
