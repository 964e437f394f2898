"""Quantizing MiniLM (all-MiniLM-L6-v2 sentence embeddings): ORT defaults, ORT dynamic, hand-picked ORT,
onnxforge's default and each onnxforge candidate alone.

The model is exported offline (``examples/minilm_export.py``: dynamo, dynamic batch and sequence)
as (input_ids, attention_mask) -> L2-normalized mean-pooled embeddings [batch, 384]. Calibration
sentences come from fixed templates (deterministic, 8-40 tokens, tokenized one by one: variable
length, never padded); the held-out sentences below are hand-written and disjoint from them.

Rows: fp32; the fp32 graph onnxforge quantizes from (residual Adds as Sum, see
onnxforge.pipeline.quantize.skip_layer_norm: how much of a speedup is that rewrite);
``quantize_static`` defaults (QDQ S8S8 per-tensor, all ops); ``quantize_dynamic`` per-channel;
static QDQ U8S8 per-channel on the weight MatMuls only (attention MatMuls excluded); onnxforge's
default with the gate every held-out sentence's cosine >= 0.99 (``--metric min-cosine --tolerance
0.99``); then every candidate that default run measured, quantized alone (no mixed precision).
Columns: speedup vs fp32 at batch 1 and 32 with 1 and 2 threads (all models timed interleaved per
setting), min and mean cosine over the held-out sentences (each embedded alone, unpadded), size,
wall time and peak RSS of the quantization (each in its own process; VmHWM). The goal line checks
the default's min cosine >= 0.99, batch-32 speedup >= 2.5x and size <= 25 MB.

``python -m benchmarks quantize_minilm``. Heavy on a 2-core host (~15 minutes).
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

_SUBJECTS = [
    "The old fisherman", "Our new neighbour", "A young engineer", "The city council", "My sister",
    "The research team", "A small bakery", "The football club", "Her grandfather", "The airline",
    "The museum guide", "A local farmer", "The software company", "The orchestra", "Two students",
    "The hospital", "A famous chef", "The weather service", "The library", "Our teacher",
]
_VERBS = [
    "announced", "repaired", "painted", "discovered", "cancelled", "built", "sold", "described",
    "celebrated", "questioned", "delivered", "photographed", "recommended", "criticised", "opened",
]
_OBJECTS = [
    "a wooden boat", "the annual budget", "a strange noise in the attic", "the new railway line",
    "a recipe for lemon cake", "the results of the clinical trial", "an exhibition of Dutch paintings",
    "the broken washing machine", "a map of the mountain trails", "the winning goal", "a faster database index",
    "the summer music festival", "a cheaper flight to Lisbon", "the history of the printing press",
    "a plan to reduce traffic", "the missing library books",
]
_CLAUSES = [
    "", "", "yesterday", "after a long discussion", "despite the heavy rain", "before the holidays",
    "to everyone's surprise", "while the children were asleep", "in front of a large crowd",
    "because the deadline had moved", "for the second time this year", "with help from volunteers",
]

EVALUATION_SENTENCES = [
    "How do I reset my password if I no longer have access to my email?",
    "The stock market rallied after inflation data came in lower than expected.",
    "Bring an umbrella.",
    "Penguins cannot fly, but they are excellent swimmers.",
    "The patient was discharged from hospital three days after the operation.",
    "Which programming language should I learn first for data analysis?",
    "A thick fog rolled in from the sea and covered the harbour.",
    "The court ruled that the contract was void.",
    "Please send me the slides from this morning's presentation.",
    "Mount Everest is the highest mountain above sea level.",
    "Our quarterly sales exceeded the forecast by nine percent.",
    "The kitten chased a ball of yarn under the sofa.",
    "Electric cars are becoming cheaper to buy and to maintain.",
    "I can't believe the concert sold out in less than ten minutes!",
    "The algorithm sorts the list in logarithmic time per insertion.",
    "Fresh bread smells wonderful early in the morning.",
    "The treaty was signed by twelve countries in Geneva.",
    "Is there a pharmacy open near the station on Sundays?",
    "Solar panels generate less power in winter.",
    "He apologised for arriving late to the interview.",
    "The GPU ran out of memory while training the large model.",
    "We hiked along the cliffs and watched the seals below.",
    "The bank raised its mortgage rates for new customers.",
    "Thank you so much for the lovely birthday present.",
    "Glaciers in the Alps have shrunk dramatically over the last century.",
    "The referee showed the defender a red card.",
    "Could you translate this paragraph into Spanish?",
    "The factory will close next year, affecting four hundred jobs.",
    "Honey never spoils if it is stored properly.",
    "The film won the award for best screenplay.",
    "Store the vaccine between two and eight degrees Celsius.",
    "The toddler refused to eat anything green.",
    "Cybersecurity experts warned about a new phishing campaign targeting banks.",
    "The bridge was closed for repairs over the weekend.",
    "My phone keeps restarting whenever I open the camera app.",
    "The poet read from her latest collection at the bookshop.",
    "Wind turbines now supply a third of the country's electricity.",
    "Let's meet at the cafe on the corner at noon.",
    "The archaeologists uncovered Roman coins beneath the town square.",
    "The update fixed the bug that crashed the app on startup, according to the release notes published on Monday.",
]


def calibration_sentences(count: int = 160, seed: int = 0) -> list[str]:
    """``count`` distinct template sentences (deterministic for a seed), one to three clauses long."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        for _ in range(rng.randint(0, 2)):
            clause = rng.choice(_CLAUSES)
            if clause:
                parts.append(clause)
        sentence = " ".join(parts) + rng.choice([".", ".", "!", "?"] if len(parts) > 3 else ["."])
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


_ORT_STATIC = """
import glob, time, numpy as np, onnx, onnxruntime.quantization as q
files = sorted(glob.glob({calib_dir!r} + "/*.npz"))
class R(q.CalibrationDataReader):
    def __init__(self): self.it = iter(files)
    def get_next(self):
        f = next(self.it, None)
        return None if f is None else dict(np.load(f))
t = time.perf_counter()
q.quant_pre_process({src!r}, {pre!r}, skip_symbolic_shape=True)
kwargs = dict({kwargs})
if {weights_only!r}:
    m = onnx.load({pre!r}, load_external_data=False)
    inits = {{i.name for i in m.graph.initializer}}
    kwargs["op_types_to_quantize"] = ["MatMul"]
    kwargs["nodes_to_exclude"] = [n.name for n in m.graph.node if n.op_type == "MatMul" and not set(n.input) & inits]
q.quantize_static({pre!r}, {dst!r}, R(), **kwargs)
print('SECONDS', time.perf_counter() - t)
"""

_ORT_DYNAMIC = """
import time, onnxruntime.quantization as q
t = time.perf_counter()
q.quantize_dynamic({src!r}, {dst!r}, per_channel=True, weight_type=q.QuantType.QInt8)
print('SECONDS', time.perf_counter() - t)
"""

_FORGE_RUN = """
import time
from pathlib import Path
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.quantize import quantize, QuantizeConfig, parse_scheme
from onnxforge.errors import QualityGateError
t = time.perf_counter()
schemes = tuple(parse_scheme(s) for s in {schemes!r}) or None
try:
    r = quantize({src!r}, {dst!r}, Path({calib_dir!r}), QuantizeConfig(
        eval_data=Path({eval_dir!r}), metric=Metric({metric!r}), tolerance=0.99, latency_rounds={rounds},
        schemes=schemes, mixed_precision=schemes is None, error_report=False))
except QualityGateError as e:  # the most accurate candidate is saved: measure it, say so
    print('SECONDS', time.perf_counter() - t)
    print('CHOSEN none within tolerance; best saved:', str(e).split("the best, ")[-1].split(",")[0])
else:
    print('SECONDS', time.perf_counter() - t)
    print('CHOSEN', r.chosen)
    for n in r.notes: print('NOTE', n)
    for c in r.candidates: print('CANDIDATE', c.scheme, c.score, c.speedup, c.error)
    for c in r.candidates: print('SCHEME', c.scheme)
"""


# Peak memory: VmHWM of the child, not _common.peak_rss_mb's ru_maxrss, which Linux keeps across
# execve: every child here reported this (torch-holding) parent's ~1150 MB instead of its own.
_HWM = "\nprint('VMHWM_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"


def _seconds(stdout: str) -> float:
    return float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("SECONDS")))


def _peak_mb(code: str) -> tuple[float, str]:
    from benchmarks._common import peak_rss_mb

    _, stdout = peak_rss_mb(code + _HWM)
    return int(next(line.split()[1] for line in stdout.splitlines() if line.startswith("VMHWM_KB"))) / 1024.0, stdout


def prepare(folder: Path, calibration_count: int = 160, source: str | None = None):
    """Export MiniLM (or ``source``, a file.py:callable taking the same inputs) into ``folder`` and
    write one .npz per sentence (calibration/, eval/), tokenized by MiniLM's tokenizer.

    Returns (fp32 path, calibration folder, evaluation folder, tokens(sentences, pad) function,
    calibration token lengths).
    """
    import numpy as np

    from onnxforge.converters import ExportConfig, export

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import minilm_export

    fp32 = folder / "minilm.onnx"
    export(source or f"{Path(minilm_export.__file__).resolve()}:build", fp32, ExportConfig(
        dynamic_batch=True, dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}))
    _, tokenizer, _ = minilm_export.load()

    def tokens(sentences: list[str], pad: bool = False) -> dict:
        batch = tokenizer(sentences, padding=pad, return_tensors="np")
        return {k: np.asarray(batch[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}

    calib_dir, eval_dir = folder / "calibration", folder / "eval"
    calib_dir.mkdir(exist_ok=True)
    eval_dir.mkdir(exist_ok=True)
    sentences = calibration_sentences(calibration_count)
    for i, s in enumerate(sentences):  # one file per sentence: variable length, no padding
        np.savez(calib_dir / f"{i:04d}.npz", **tokens([s]))
    for i, s in enumerate(EVALUATION_SENTENCES):
        np.savez(eval_dir / f"{i:04d}.npz", **tokens([s]))
    lengths = [tokens([s])["input_ids"].shape[1] for s in sentences]
    return fp32, calib_dir, eval_dir, tokens, lengths


def measure(paths: dict[str, Path], info: dict[str, dict], tokens, rounds_b1: int, rounds_b32: int) -> dict[int, int]:
    """Fill ``info[name]`` for every model: min/mean cosine to fp32 over the held-out sentences (each
    alone), size, and speedups vs fp32 at batch 1 and 32 with 1 and 2 threads (interleaved per
    setting); returns the token counts timed at each batch."""
    import numpy as np

    from onnxforge.targets import CpuTarget
    from onnxforge.targets.latency import compare_latency

    target = CpuTarget()
    singles = [tokens([s]) for s in EVALUATION_SENTENCES]
    for name, path in paths.items():
        session = target.session(path, threads=2)
        info[name]["embeddings"] = np.concatenate([session.run(None, feed)[0] for feed in singles])
        info[name]["bytes"] = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    ref = info["fp32"]["embeddings"]
    for name in paths:
        emb = info[name].pop("embeddings")
        cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        info[name]["min_cosine"] = float(cos.min())
        info[name]["mean_cosine"] = float(cos.mean())
    feeds = {1: tokens([EVALUATION_SENTENCES[0]]), 32: tokens(EVALUATION_SENTENCES[:32], pad=True)}
    for batch, feed in feeds.items():
        for threads in (1, 2):
            sessions = {name: target.session(path, threads=threads) for name, path in paths.items()}
            stats = compare_latency(sessions, feed, rounds=rounds_b1 if batch == 1 else rounds_b32,
                                    warmup=2, runs_per_round=1 if batch == 32 else 3)
            for name in paths:
                info[name][f"speedup_b{batch}_t{threads}"] = stats["fp32"].p50_ms / stats[name].p50_ms
                info[name][f"p50_ms_b{batch}_t{threads}"] = stats[name].p50_ms
    return {b: int(f["input_ids"].shape[1]) for b, f in feeds.items()}


def results_table(info: dict[str, dict]) -> str:
    from benchmarks._common import markdown_table

    headers = ["approach", "x b1 t1", "x b1 t2", "x b32 t1", "x b32 t2", "min cos", "mean cos", "size MB",
               "time s", "peak MB"]
    rows = [
        [
            name,
            *(f"{v[f'speedup_b{b}_t{t}']:.2f}" for b in (1, 32) for t in (1, 2)),
            f"{v['min_cosine']:.4f}",
            f"{v['mean_cosine']:.4f}",
            f"{v['bytes'] / 2**20:.1f}",
            f"{v['seconds']:.1f}",
            f"{v['peak_rss_mb']:.0f}" if v["peak_rss_mb"] else "-",
        ]
        for name, v in info.items()
    ]
    return markdown_table(headers, rows)


def forge_run(src: Path, dst: Path, calib_dir: Path, eval_dir: Path, schemes: tuple[str, ...] = ()):
    """onnxforge quantize in its own process, gate min-cosine >= 0.99: (chosen, log lines, peak MB, seconds)."""
    peak, stdout = _peak_mb(_FORGE_RUN.format(src=str(src), dst=str(dst), calib_dir=str(calib_dir),
                                              eval_dir=str(eval_dir), metric="min-cosine", rounds=10, schemes=schemes))
    chosen = next(line.split(" ", 1)[1] for line in stdout.splitlines() if line.startswith("CHOSEN"))
    lines = [line for line in stdout.splitlines() if line.startswith(("NOTE", "CANDIDATE", "SCHEME"))]
    return chosen, lines, peak, _seconds(stdout)


def run(calibration_count: int = 160, rounds_b1: int = 15, rounds_b32: int = 4, candidates: bool = True) -> dict:
    import onnx

    from benchmarks._common import write_results
    from onnxforge.pipeline.quantize import parse_scheme, scheme_id
    from onnxforge.pipeline.quantize.skip_layer_norm import residual_sums

    info: dict[str, dict] = {}
    forge_log: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quant-minilm-") as tmp:
        tmp = Path(tmp)
        fp32, calib_dir, eval_dir, tokens, lengths = prepare(tmp, calibration_count)

        paths = {"fp32": fp32}
        info["fp32"] = {"seconds": 0.0, "peak_rss_mb": None}
        sums = tmp / "fp32_residual_sums.onnx"
        onnx.save_model(residual_sums(onnx.load(str(fp32)))[0], str(sums))
        paths["fp32, residual Adds as Sum (the graph onnxforge quantizes)"] = sums
        info["fp32, residual Adds as Sum (the graph onnxforge quantizes)"] = {"seconds": 0.0, "peak_rss_mb": None}
        ort_runs = {
            "ORT quantize_static defaults (QDQ S8S8 per-tensor)": _ORT_STATIC.format(
                calib_dir=str(calib_dir), src=str(fp32), pre=str(tmp / "pre_0.onnx"), dst="{dst}", kwargs="",
                weights_only=False),
            "ORT quantize_dynamic per-channel": _ORT_DYNAMIC.format(src=str(fp32), dst="{dst}"),
            "ORT hand-picked: static QDQ U8S8 per-channel, attention MatMuls excluded": _ORT_STATIC.format(
                calib_dir=str(calib_dir), src=str(fp32), pre=str(tmp / "pre_2.onnx"), dst="{dst}",
                kwargs="activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, per_channel=True",
                weights_only=True),
        }
        for i, (name, code) in enumerate(ort_runs.items()):
            dst = tmp / f"ort_{i}.onnx"
            peak, stdout = _peak_mb(code.replace("'{dst}'", repr(str(dst))))
            paths[name] = dst
            info[name] = {"seconds": _seconds(stdout), "peak_rss_mb": peak}

        chosen, log, peak, seconds = forge_run(fp32, tmp / "forge_default.onnx", calib_dir, eval_dir)
        default = f"onnxforge default, min-cosine >= 0.99 (chose {chosen})"
        paths[default] = tmp / "forge_default.onnx"
        info[default] = {"seconds": seconds, "peak_rss_mb": peak, "chosen": chosen}
        forge_log[default] = [line for line in log if not line.startswith("SCHEME")]
        measured = [line.split(" ", 1)[1] for line in log if line.startswith("SCHEME")]
        for i, label in enumerate(m for m in measured if candidates and "float node" not in m):
            scheme = scheme_id(parse_scheme(label.lower().replace(" ", "-")))
            dst = tmp / f"forge_{i}.onnx"
            _, _, peak, seconds = forge_run(fp32, dst, calib_dir, eval_dir, (scheme,))
            paths[f"onnxforge {scheme}"] = dst
            info[f"onnxforge {scheme}"] = {"seconds": seconds, "peak_rss_mb": peak}

        seq = measure(paths, info, tokens, rounds_b1, rounds_b32)

    table = results_table(info)
    best = info[default]
    goals = {
        "every sentence's cosine >= 0.99": best["min_cosine"] >= 0.99,
        ">= 2.5x fp32 at batch 32 (1 thread)": best["speedup_b32_t1"] >= 2.5,
        ">= 2.5x fp32 at batch 32 (2 threads)": best["speedup_b32_t2"] >= 2.5,
        "file <= 25 MB": best["bytes"] <= 25 * 2**20,
    }
    print(f"### Quantization: all-MiniLM-L6-v2 ({len(EVALUATION_SENTENCES)} held-out sentences; "
          f"{calibration_count} calibration sentences, {min(lengths)}-{max(lengths)} tokens; timing at "
          f"{seq[1]} tokens for batch 1, {seq[32]} padded for batch 32)\n")
    print(table)
    print("\ngoals for the default (" + chosen + "): " + "; ".join(
        f"{goal}: {'yes' if met else 'NO'}" for goal, met in goals.items()))
    for name, lines in forge_log.items():
        print(f"\n{name}:")
        print("\n".join("  " + line for line in lines))
    path = write_results("quantize_minilm", {"results": info, "table": table, "onnxforge_runs": forge_log,
                                             "goals": goals, "timing_tokens": seq,
                                             "calibration_sentences": calibration_count})
    print(f"\nwritten {path}")
    return info


if __name__ == "__main__":
    run()
