"""PaddleOCR's PP-OCRv4 detector and recognizer and its direction classifier, real weights (from the
``rapidocr-onnxruntime`` wheel), judged by the OCR task itself on rendered text (ocr_task.py), not only
by cosine. Their conventions: dims declared -1 or '?', weights in Constant nodes, opset 11/12."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_runs import folder, outcome, run_cli  # noqa: F401 (folder: a fixture)
from ocr_task import (
    characters,
    classifier_inputs,
    lines_found,
    lines_read,
    page,
    recognizer_inputs,
    text_lines,
)
from realworld_models import require

pytestmark = pytest.mark.slow  # minutes: real models


def _run(path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def rec(folder):
    path = require("ppocr_rec")
    texts = text_lines(40, seed=1)
    np.savez(folder / "rec_calib.npz", x=recognizer_inputs(text_lines(60, seed=5)))
    return path, texts, recognizer_inputs(texts), characters(path)


@pytest.fixture(scope="module")
def det(folder):
    path = require("ppocr_det")
    pages = [page(seed, 320, 480) for seed in range(100, 116)]
    np.savez(folder / "det_calib.npz", x=np.stack([p for p, _ in pages]))
    held = [page(seed, 320, 480) for seed in range(8)]
    return path, np.stack([p for p, _ in held]), [b for _, b in held]


def test_minus_one_and_question_mark_dims_are_dynamic(folder):
    # PaddleOCR declares [-1, 3, ?, ?]: every command exited 2 ("dims must be >= 0") or asked for --input-shape
    cls = require("ppocr_cls")
    for args in (("inspect", cls), ("simplify", cls, "-o", folder / "cls_s.onnx"),
                 ("profile", cls, "--min-seconds", "0.2")):
        code, out, err, _ = run_cli(*args)
        assert code == 0, err
    assert "guessed" in out  # profile says which shapes it chose for the dynamic dims


def test_recognizer_low_rank_keeps_reading_the_lines(folder, rec):
    path, texts, images, alphabet = rec
    before = lines_read(_run(path, {"x": images})[0], alphabet, texts)
    assert before >= 36  # fp32 reads 38-40 of 40 rendered lines
    out, report = folder / "rec_lr.onnx", folder / "rec_lr.json"
    code, _, err, _ = run_cli("prune", path, "-o", out, "--method", "low-rank", "--calibration",
                              folder / "rec_calib.npz", "--json", report)
    data = outcome(code, report, err)
    if code == 0:
        assert data["quality_measured"] and data["speed"]["batch"] == 1 and data["measured_speedup"] > 0
        after = lines_read(_run(out, {"x": images})[0], alphabet, texts)
        assert after >= before, f"OCR {before} -> {after} of {len(texts)} lines"  # decoded lines gate it
        assert all(info["rank"] > 1 for info in data["factored_layers"].values())  # not rank 1 ("energy 0.97")


def test_detector_channel_pruning_never_passes_a_detector_that_misses_lines(folder, det):
    path, pages, boxes = det
    before = sum(lines_found(p[0], b) for p, b in zip(_run(path, {"x": pages})[0], boxes, strict=False))
    out, report = folder / "det_p.onnx", folder / "det_p.json"
    code, _, err, _ = run_cli("prune", path, "-o", out, "--method", "channels", "--ratio", "0.3", "--calibration",
                              folder / "det_calib.npz", "--json", report)
    data = outcome(code, report, err)
    weights = onnx.load(str(out)).graph.initializer
    assert not [w.name for w in weights if 0 in w.dims and "pruned" in w.name]  # never a layer with 0 channels
    found = sum(lines_found(p[0], b) for p, b in zip(_run(out, {"x": pages})[0], boxes, strict=False))
    if code == 0:
        assert found >= before - 1, f"lines found {before} -> {found}"
        assert data["macs_are_estimates"] and data["speed"] is not None
    else:
        assert found == before  # the unpruned model is what was saved
        assert all(t["score"] is not None for t in data["tried"])


def test_detector_quantize_stays_under_max_memory(folder, det):
    path, pages, boxes = det
    out, report = folder / "det_q.onnx", folder / "det_q.json"
    code, _, err, peak = run_cli("quantize", path, "-o", out, "--calibration", folder / "det_calib.npz",
                                 "--max-memory", "2G", "--json", report)
    data = outcome(code, report, err)
    assert peak is not None and peak * 1024 < 2 << 30, f"peak {peak / 2**20:.2f} GiB"
    assert all(c["latency"] for c in data["candidates"] if not c["error"])
    if code == 0:
        found = sum(lines_found(p[0], b) for p, b in zip(_run(out, {"x": pages})[0], boxes, strict=False))
        before = sum(lines_found(p[0], b) for p, b in zip(_run(path, {"x": pages})[0], boxes, strict=False))
        assert found >= before - 1


def test_opset_11_direction_classifier_keeps_per_channel_and_its_answers(folder):
    path = require("ppocr_cls")
    images, answers = classifier_inputs(text_lines(30, seed=3))
    np.savez(folder / "cls_calib.npz", x=images)
    before = float((_run(path, {"x": images})[0].argmax(1) == answers).mean())
    out, report = folder / "cls_q.onnx", folder / "cls_q.json"
    code, _, err, _ = run_cli("quantize", path, "-o", out, "--calibration", folder / "cls_calib.npz", "--json", report)
    data = outcome(code, report, err)
    assert any("opset 11 upgraded to 13" in n for n in data["notes"])
    assert all(c["error"] is None for c in data["candidates"]), [c["error"] for c in data["candidates"]]
    if code == 0:
        after = float((_run(out, {"x": images})[0].argmax(1) == answers).mean())
        assert after >= before - 0.05
