"""Transformer structure on MiniLM (all-MiniLM-L6-v2): FFN neurons and attention heads removed on the
ONNX graph (``prune_channels`` with ``ratio`` and ``head_ratio``), refit by least squares, then int8.

The model, the calibration sentences (template sentences, tokenized one by one) and the held-out
sentences are those of ``benchmarks/quantize_minilm.py`` (``prepare``), and so are the columns
(``measure``: min/mean cosine of every held-out sentence's embedding, each embedded alone, against
fp32; speedup vs fp32 at batch 1 and 32 with 1 and 2 threads, all models timed interleaved per
setting; file size). Pruning: activation importance and the least-squares repair on the calibration
sentences padded to their longest (prune_model + repair_model, no gate: every row is the setting
named). Quantization: onnxforge ``quantize`` with one scheme (default ``dynamic-s8-per-channel-smooth-
int8-embeddings``, what onnxforge's default chose for fp32 MiniLM; gate: min cosine >= 0.99 against its
own input, objective size, so a loaded machine's timing noise cannot make it keep the input), on fp32
and on the pruned graphs named in ``quantized``.

``--distill-seconds N`` adds recovery by distillation (benchmarks/_minilm_distill.py): ffn 0.5 (+ heads
2/12) repaired vs distilled for N seconds against the transformers model, then int8, on the Hugging
Face folder's export; its own table (sentence embedding = mean of ``last_hidden_state`` over real tokens).

``python -m benchmarks prune_minilm_structure`` (or ``python benchmarks/prune_minilm_structure.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SETTINGS = ((0.25, 0.0), (0.5, 0.0), (0.0, 2 / 12), (0.5, 2 / 12))
SCHEME = "dynamic-s8-per-channel-smooth-int8-embeddings"


def _label(ratio: float, head_ratio: float) -> str:
    parts = [f"ffn {ratio:g}"] if ratio else []
    parts += [f"heads {round(head_ratio * 12)}/12"] if head_ratio else []
    return " + ".join(parts)


def run(settings: tuple[tuple[float, float], ...] = DEFAULT_SETTINGS,
        quantized: tuple[tuple[float, float], ...] = ((0.5, 2 / 12),), calibration_count: int = 64,
        rounds_b1: int = 10, rounds_b32: int = 4, scheme: str = SCHEME) -> dict:
    import numpy as np
    import onnx

    from benchmarks._common import write_results
    from benchmarks.quantize_minilm import calibration_sentences, measure, prepare, results_table
    from onnxforge.errors import QualityGateError
    from onnxforge.pipeline.calibration import SampleSet
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Importance, Repair, prune_model
    from onnxforge.pipeline.prune.repair import repair_model
    from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize
    from onnxforge.pipeline.quantize.config import Objective as QuantObjective

    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-structure-minilm-") as tmp:
        tmp = Path(tmp)
        fp32, calib_dir, eval_dir, tokens, _ = prepare(tmp, calibration_count)
        padded = tokens(calibration_sentences(calibration_count), pad=True)
        np.savez(tmp / "calibration_padded.npz", **padded)
        calibration = SampleSet(padded, None, "calibration sentences, padded")
        model = onnx.load(str(fp32))
        paths = {"fp32": fp32}
        info["fp32"] = {"seconds": 0.0, "peak_rss_mb": None}
        pruned_paths = {}
        for ratio, head_ratio in settings:
            config = ChannelPruneConfig(ratio=ratio, head_ratio=head_ratio, importance=Importance.ACTIVATION,
                                        repair=Repair.LEAST_SQUARES, calibration_data=tmp / "calibration_padded.npz")
            print(f"pruning {_label(ratio, head_ratio)}", flush=True)
            pruned = prune_model(model, config, calibration)
            repaired, errors = repair_model(model, pruned, calibration, config)
            name = _label(ratio, head_ratio)
            path = tmp / f"pruned_{len(pruned_paths)}.onnx"
            onnx.save(repaired, str(path))
            paths[name] = pruned_paths[(ratio, head_ratio)] = path
            refit = [e for e in errors.values() if "after" in e]
            info[name] = {"seconds": 0.0, "peak_rss_mb": None, "pruned_layers": pruned.pruned_layers,
                          "repair_error_mean": {"before": float(np.mean([e["before"] for e in refit])),
                                                "after": float(np.mean([e["after"] for e in refit]))}}
        sources = {"fp32": fp32} | {_label(*s): pruned_paths[s] for s in quantized if s in pruned_paths}
        for i, (name, source) in enumerate(sources.items()):
            dst = tmp / f"int8_{i}.onnx"
            print(f"quantizing {name}", flush=True)
            label = f"{name} + int8"
            started = time.perf_counter()
            try:
                quantize(source, dst, calib_dir, QuantizeConfig(
                    eval_data=eval_dir, metric=Metric("min-cosine"), tolerance=0.99, schemes=(parse_scheme(scheme),),
                    mixed_precision=False, error_report=False, latency_rounds=3, objective=QuantObjective.SIZE))
                note = "within min cosine 0.99 of its input"
            except QualityGateError as e:  # the best candidate is saved: measure it, say so
                note = f"missed its gate: {e.message}"
                dst = Path(e.best_path) if e.best_path else dst
            if dst.exists():
                paths[label] = dst
                info[label] = {"seconds": time.perf_counter() - started, "peak_rss_mb": None, "note": note}
            print(f"  {note}", flush=True)
        print("measuring", flush=True)
        seq = measure(paths, info, tokens, rounds_b1, rounds_b32)

    table = results_table(info)
    print(f"### Transformer structure on all-MiniLM-L6-v2 (timed at {seq[32]} tokens, batch 32; "
          f"speedup = fp32 p50 / model p50, interleaved)\n")
    print(table)
    path = write_results("prune_minilm_structure", {"results": info, "table": table, "settings": list(settings)})
    print(f"\nwritten {path}")
    return info


def run_distillation(budget_s: float, settings: tuple[tuple[float, float], ...] = ((0.5, 0.0), (0.5, 2 / 12)),
                     calibration_count: int = 256) -> dict:
    """Repaired vs distilled (``budget_s`` of training each) vs + int8; see benchmarks/_minilm_distill.py."""
    from benchmarks._common import write_results
    from benchmarks._minilm_distill import run_distill

    info, table = run_distill(settings, budget_s, calibration_count)
    print(f"### Recovery on all-MiniLM-L6-v2's folder: repaired vs distilled {budget_s:g} s "
          f"(batch 32, 1 thread, interleaved)\n")
    print(table)
    path = write_results("prune_minilm_distill", {"results": info, "table": table, "budget_s": budget_s,
                                                  "settings": list(settings)})
    print(f"\nwritten {path}")
    return info


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calibration-count", type=int, default=64)
    parser.add_argument("--rounds-b32", type=int, default=4)
    parser.add_argument("--distill-seconds", type=float, default=0.0,
                        help="also distill ffn 0.5 (+ heads 2/12) for this many seconds each (0: skip)")
    parser.add_argument("--skip-structure", action="store_true", help="only the distillation section")
    args = parser.parse_args()
    if not args.skip_structure:
        run(calibration_count=args.calibration_count, rounds_b32=args.rounds_b32)
    if args.distill_seconds > 0:
        run_distillation(args.distill_seconds)
