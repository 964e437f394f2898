"""PP-OCRv4's recognizer rows: low-rank and quantize under the default gates, and quantize with the task
itself as the gate (``--metric tests/realworld/ocr_metric.py:score --tolerance 0.06``: at most 3 of 50
lines read fewer than the input reads).

Three sets of rendered lines, drawn apart: 80 calibrate (seed 5), 50 labelled ones are the task gate's
eval data (seed 2), and 50 test lines (seed 1) are what every row's "lines read" counts, so the task
gate's choice is checked on lines it never saw.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from benchmarks._stage_outcome import session, speed, stage, time_to_result, verdict

_TASK = Path(__file__).resolve().parents[1] / "tests" / "realworld"
TASK_TOLERANCE = 0.06  # 3 lines of 50


def recognizer_rows(folder: Path, rec: Path) -> list[list[str]]:
    from ocr_metric import MODEL_ENV
    from ocr_task import characters, lines_read, recognizer_inputs, text_lines

    from onnxforge.pipeline.prune.low_rank import LowRankConfig, low_rank
    from onnxforge.pipeline.quantize import QuantizeConfig, quantize

    texts = text_lines(50, seed=1)
    images, alphabet = recognizer_inputs(texts), characters(rec)
    calibration = folder / "rec.npz"
    np.savez(calibration, x=recognizer_inputs(text_lines(80, seed=5)))
    gate_texts = text_lines(50, seed=2)
    np.savez(folder / "rec_eval.npz", x=recognizer_inputs(gate_texts), label=np.array(gate_texts))  # text labels
    os.environ[MODEL_ENV] = str(rec)  # the metric's child process reads the alphabet from this model
    task_gate = QuantizeConfig(metric=f"{_TASK / 'ocr_metric.py'}:score", tolerance=TASK_TOLERANCE,
                               eval_data=folder / "rec_eval.npz")

    def quantize_with(config):
        return lambda i, o, _: quantize(i, o, calibration, config)

    before = lines_read(session(rec).run(None, {"x": images})[0], alphabet, texts)
    rows = []
    for name, fn, config in (
        ("low-rank", low_rank, LowRankConfig(calibration_data=calibration)),
        ("quantize", quantize_with(QuantizeConfig()), None),
        (f"quantize, task gate (lines read, tolerance {TASK_TOLERANCE:g})", quantize_with(task_gate), None),
    ):
        out = folder / f"rec_{len(rows)}.onnx"
        with time_to_result() as took:  # issue 23: time to result, wall and CPU (the host is shared)
            code, result = stage(fn, rec, out, config)
        after = lines_read(session(out).run(None, {"x": images})[0], alphabet, texts)
        gate = ""
        chosen = next((c for c in result.get("candidates", []) if c["scheme"] == result.get("chosen")), None)
        if result.get("metric") == "user" and chosen is not None:  # the gate's own lines, beside the test lines
            n = result["eval_samples"]
            gate = f"; gate lines {result['fp32_score'] * n:.0f} -> {chosen['score'] * n:.0f} of {n}"
        rows.append(["PP-OCRv4 recognizer", name, verdict(code, result), speed(result),
                     f"lines read {before} -> {after} of {len(texts)}{gate}; took {took[0]:.0f} s "
                     f"({took[1]:.0f} CPU-s)"])
    return rows
