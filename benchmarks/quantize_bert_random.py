"""Quantizing a second encoder: a transformers ``BertModel`` built from a small config with random
weights (seed 0; hidden 256, 4 layers, 4 heads, FFN 1024, BERT's 30522-token vocabulary), wrapped like
MiniLM (mean pooling + L2 normalization) and exported the same way (dynamo, dynamic batch and sequence).

Random weights say nothing about a task; what they show is whether the transformer path (fusions,
residual sums, SmoothQuant, int8 embeddings, the candidates) holds on a model onnxforge was not tuned
on. Same sentences, tokenizer, gate (every held-out sentence's cosine >= 0.99 vs fp32) and columns as
``quantize_minilm``. Rows: fp32, the residual-sum fp32 graph, ORT ``quantize_dynamic`` per-channel,
onnxforge's default.

``python -m benchmarks quantize_bert_random`` (needs transformers, like quantize_minilm).
"""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path

from benchmarks.quantize_minilm import (
    _ORT_DYNAMIC,
    EVALUATION_SENTENCES,
    _peak_mb,
    _seconds,
    forge_run,
    measure,
    prepare,
    results_table,
)

_SOURCE = '''
import sys
if "torchvision" not in sys.modules:
    sys.modules["torchvision"] = None
sys.path.insert(0, {examples!r})
import torch
import transformers
from minilm_export import SENTENCES, SentenceEmbedder, load


def build():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024)
    model = SentenceEmbedder(transformers.BertModel(config, add_pooling_layer=False).eval()).eval()
    _, tokenizer, _ = load()
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    return model, {{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}}
'''


def run(calibration_count: int = 160, rounds_b1: int = 15, rounds_b32: int = 4) -> dict:
    import onnx

    from benchmarks._common import write_results
    from onnxforge.pipeline.quantize.skip_layer_norm import residual_sums

    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quant-bert-") as tmp:
        tmp = Path(tmp)
        source = tmp / "random_bert.py"
        examples = Path(__file__).resolve().parents[1] / "examples"
        source.write_text(textwrap.dedent(_SOURCE.format(examples=str(examples))))
        fp32, calib_dir, eval_dir, tokens, _lengths = prepare(tmp, calibration_count, source=f"{source}:build")
        paths = {"fp32": fp32}
        info["fp32"] = {"seconds": 0.0, "peak_rss_mb": None}
        sums = tmp / "fp32_residual_sums.onnx"
        onnx.save_model(residual_sums(onnx.load(str(fp32)))[0], str(sums))
        paths["fp32, residual Adds as Sum"] = sums
        info["fp32, residual Adds as Sum"] = {"seconds": 0.0, "peak_rss_mb": None}
        dynamic = tmp / "ort_dynamic.onnx"
        peak, stdout = _peak_mb(_ORT_DYNAMIC.format(src=str(fp32), dst=str(dynamic)))
        paths["ORT quantize_dynamic per-channel"] = dynamic
        info["ORT quantize_dynamic per-channel"] = {"seconds": _seconds(stdout), "peak_rss_mb": peak}
        chosen, log, peak, seconds = forge_run(fp32, tmp / "forge.onnx", calib_dir, eval_dir)
        default = f"onnxforge default, min-cosine >= 0.99 (chose {chosen})"
        paths[default] = tmp / "forge.onnx"
        info[default] = {"seconds": seconds, "peak_rss_mb": peak, "chosen": chosen}
        seq = measure(paths, info, tokens, rounds_b1, rounds_b32)

    table = results_table(info)
    print(f"### Quantization: random-weight BertModel (hidden 256, 4 layers; {len(EVALUATION_SENTENCES)} held-out "
          f"sentences, {calibration_count} calibration sentences; timing at {seq[1]} tokens for batch 1, "
          f"{seq[32]} padded for batch 32)\n")
    print(table)
    notes = [line for line in log if not line.startswith("SCHEME")]
    print("\n" + default + ":\n" + "\n".join("  " + line for line in notes))
    path = write_results("quantize_bert_random", {"results": info, "table": table, "onnxforge_run": notes,
                                                  "timing_tokens": seq})
    print(f"\nwritten {path}")
    return info


if __name__ == "__main__":
    run()
