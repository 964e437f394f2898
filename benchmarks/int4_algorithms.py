"""Library vs our own: int4 weight-only RTN (what ``quantize`` ships) vs onnxruntime's calibrated int4
algorithms (``matmul_nbits_quantizer``: HQQ, GPTQ) on a small transformer built from a config.

A transformers ``BertModel`` from a small config (hidden 256, 4 layers, 4 heads, FFN 1024, vocabulary
30522, seed 0: random weights), exported by torch (TorchScript exporter, opset 17), then every MatMul
with a constant weight quantized to 4 bits in blocks of 32 along K (symmetric, as onnxforge's int4).
Quality: cosine of each sequence's mean token state vs fp32 on 64 held-out sequences (random ids,
16-48 tokens), and the relative error of all token states. GPTQ calibrates on 16 other sequences.
Latency: p50 at batch 1 x 32 tokens, 1 thread, fp32 and every int4 model interleaved in one run.

AWQ is not measured: onnxruntime's only AWQ is ``NVAWQWeightOnlyQuantConfig`` (NVIDIA ModelOpt), and
neural-compressor's lives in a separate package. ``python -m benchmarks int4_algorithms`` (needs
transformers, like quantize_bert_random).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if "torchvision" not in sys.modules:  # FACTS.md: torchvision breaks `import transformers` beside this CPU torch
    sys.modules["torchvision"] = None  # type: ignore[assignment]

BLOCK = 32
VOCAB = 30522


def _sequences(rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(count):
        length = int(rng.integers(16, 49))
        ids = rng.integers(1000, VOCAB, size=(1, length)).astype(np.int64)
        ids[0, 0], ids[0, -1] = 101, 102  # [CLS] ... [SEP]
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return out


def export_model(folder: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024, vocab_size=VOCAB, attn_implementation="eager")
    model = transformers.BertModel(config).eval()

    class States(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(1000, VOCAB, (2, 24))
    path = folder / "bert.onnx"
    axes = {0: "batch", 1: "sequence"}
    with contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(States().eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["states"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "states": axes})
    return path


def quantize(path: Path, algorithm: str, calibration: list[dict[str, np.ndarray]], out: Path) -> float:
    """Write the int4 model; returns the seconds the quantizer took."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    model = onnx.load(str(path))
    if algorithm == "rtn (ours)":  # exactly what onnxforge's int4 candidate runs (backends._int4)
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK, is_symmetric=True,
                                         op_types_to_quantize=("MatMul",))
    else:
        config = (HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4) if algorithm == "hqq"
                  else GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=BLOCK))
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK, is_symmetric=True,
                                         op_types_to_quantize=("MatMul",), algo_config=config)
    start = time.perf_counter()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        quantizer.process()
    seconds = time.perf_counter() - start
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return seconds


def _session(path: Path):
    import onnxruntime as ort

    from onnxforge._ort_logs import session_options

    options = session_options()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(folder: Path, rounds: int = 40) -> dict:
    from onnxforge.targets.latency import compare_latency

    rng = np.random.default_rng(0)
    held_out, calibration = _sequences(rng, 64), _sequences(rng, 16)
    fp32 = export_model(folder)
    reference = [_session(fp32).run(None, f)[0] for f in held_out]
    paths, build = {"fp32": fp32}, {}
    for algorithm in ("rtn (ours)", "hqq", "gptq"):
        out = folder / f"{algorithm.split()[0]}.onnx"
        build[algorithm] = quantize(fp32, algorithm, calibration, out)
        paths[algorithm] = out
    rows: dict[str, dict] = {}
    for name, path in paths.items():
        session = _session(path)
        got = [session.run(None, f)[0] for f in held_out]
        pooled = [(g.mean(1)[0], r.mean(1)[0]) for g, r in zip(got, reference, strict=True)]
        cosines = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in pooled]
        error = float(np.sqrt(sum(((g - r) ** 2).sum() for g, r in zip(got, reference, strict=True))
                              / sum((r ** 2).sum() for r in reference)))
        rows[name] = {"min_cosine": min(cosines), "mean_cosine": float(np.mean(cosines)), "relative_error": error,
                      "bytes": path.stat().st_size, "quantize_seconds": build.get(name)}
    feed = {"input_ids": np.full((1, 32), 2000, np.int64), "attention_mask": np.ones((1, 32), np.int64)}
    stats = compare_latency({n: _session(p) for n, p in paths.items()}, feed, rounds=rounds)
    for name, s in stats.items():
        rows[name]["p50_ms"] = s.p50_ms
        rows[name]["speedup"] = stats["fp32"].p50_ms / s.p50_ms
    return rows


def run() -> dict:
    from benchmarks._common import markdown_table, write_results

    with tempfile.TemporaryDirectory(prefix="bench-int4-") as tmp:
        rows = measure(Path(tmp))
    table = markdown_table(
        ["model", "min cosine vs fp32", "mean cosine", "relative error", "size MB", "p50 ms (b=1, 32 tok)",
         "speedup vs fp32", "quantize s"],
        [[name, f"{r['min_cosine']:.5f}", f"{r['mean_cosine']:.5f}", f"{r['relative_error']:.4f}",
          f"{r['bytes'] / 1e6:.1f}", f"{r['p50_ms']:.3f}", f"{r['speedup']:.2f}x",
          f"{r['quantize_seconds']:.1f}" if r["quantize_seconds"] is not None else "-"] for name, r in rows.items()])
    print("### int4 weight-only: RTN (ours) vs HQQ and GPTQ\n")
    print(table)
    print(f"\nwritten {write_results('int4_algorithms', {'rows': rows, 'table': table})}")
    return rows


if __name__ == "__main__":
    run()
