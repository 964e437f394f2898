"""ddddocr's captcha reader and detector (real weights, from the ``ddddocr`` wheel), judged by what they read
and find: ImageCaptcha captchas (captcha_task.py), click-captcha pages (captcha_det_task.py). The reader's
conventions: batch fixed at 1, a dynamic width, an LSTM, and raw CTC scores ``[T, 1, 8210]`` from a Gemm where
it declares ``[1, seqlen]``. A stage exits 0 only with every captcha the input reads still read (every
character it finds still found); else 4, with its numbers (issue 23: low-rank exited 0 reading 16 of 32
captchas against the input's 30)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from captcha_det_task import characters_found, click_pages
from captcha_task import captcha_inputs, captcha_texts, charset, read_text
from cli_runs import folder, outcome, run_cli  # noqa: F401 (folder: a fixture)
from realworld_models import require

pytestmark = pytest.mark.slow  # a minute or more: a 54 MB model quantized and factored on 2 cores

pytest.importorskip("captcha", reason="captcha is not installed (pip install 'onnxforge[realworld]')")


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 2, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _read(path, images: np.ndarray, characters: list[str]) -> list[str]:
    session = _session(path)
    return [read_text(session.run(None, {"input1": image[None]})[0], characters).lower() for image in images]


@pytest.fixture(scope="module")
def reader(folder):
    path = require("captcha_ocr")
    texts = captcha_texts(16, seed=1)
    images = captcha_inputs(texts, seed=1)[:, 0]  # [N, 1, 64, 201]: one batch-1 input per captcha
    np.savez(folder / "eval.npz", input1=images, label=np.array(texts))
    np.savez(folder / "calib.npz", input1=captcha_inputs(captcha_texts(8, seed=7), seed=7)[:, 0])
    characters = charset(path.parent)
    read = {t for t, got in zip(texts, _read(path, images, characters), strict=True) if got == t}
    assert len(read) >= 12, f"fp32 reads {len(read)} of {len(texts)}"  # 14 of 16 measured
    return path, texts, images, characters, read


def _still_read(reader, out) -> tuple[set[str], set[str]]:
    _, texts, images, characters, read = reader
    now = {t for t, got in zip(texts, _read(out, images, characters), strict=True) if got == t}
    return read, now


def test_quantize_keeps_every_captcha_the_input_reads(folder, reader):
    path = reader[0]
    out, report = folder / "q.onnx", folder / "q.json"
    code, _, err, _ = run_cli("quantize", path, "-o", out, "--calibration", folder / "calib.npz", "--eval",
                              folder / "eval.npz", "--json", report)
    data = outcome(code, report, err)
    assert "decoded sequences" in data["gate"]  # raw CTC scores are judged by what they read, not cosine alone
    read, now = _still_read(reader, out)
    if code == 0:
        assert read <= now, f"exit 0 but {sorted(read - now)} no longer read"
        chosen = next(c for c in data["candidates"] if c["scheme"] == data["chosen"])
        assert chosen["speedup_vs_fp32"] > 1.0
    else:
        assert now == read  # the input is what was saved


def test_a_task_metric_with_text_labels_picks_what_reads_every_captcha(folder, reader):
    path = reader[0]
    out, report = folder / "qm.onnx", folder / "qm.json"
    metric = f"{__file__.rsplit('/', 1)[0]}/captcha_metric.py:score"
    code, _, err, _ = run_cli("quantize", path, "-o", out, "--calibration", folder / "calib.npz", "--eval",
                              folder / "eval.npz", "--metric", metric, "--tolerance", "0", "--scheme",
                              "qdq-u8s8-per-tensor", "--scheme", "qdq-u8s8-per-channel", "--json", report)
    data = outcome(code, report, err)
    read, now = _still_read(reader, out)
    assert data["fp32_score"] == pytest.approx(len(read) / len(reader[1]))  # the metric read the text labels
    for candidate in data["candidates"]:
        assert candidate["meets_tolerance"] == (candidate["score"] >= data["fp32_score"] - 1e-9)
    if code == 0:
        assert len(now) >= len(read), f"exit 0 at {len(now)} captchas read against the input's {len(read)}"


def test_low_rank_never_exits_0_reading_fewer_captchas(folder, reader):
    path = reader[0]
    out, report = folder / "lr.onnx", folder / "lr.json"
    code, _, err, _ = run_cli("prune", path, "-o", out, "--method", "low-rank", "--calibration",
                              folder / "calib.npz", "--eval", folder / "eval.npz", "--json", report)
    data = outcome(code, report, err)
    read, now = _still_read(reader, out)
    if code == 0:
        assert read <= now, f"exit 0 but {sorted(read - now)} no longer read"
    else:
        assert now == read and all(t["score"] is not None for t in data["tried"])
        assert "--max-churn" in err or "--tolerance" in err


def test_detector_quantize_never_exits_0_finding_fewer_characters(folder):
    path = require("captcha_det")
    pages, boxes, ratios = click_pages(range(100, 112))
    np.savez(folder / "det_eval.npz", images=pages)
    np.savez(folder / "det_calib.npz", images=click_pages(range(200, 208))[0])

    def found(model) -> int:
        session = _session(model)
        return sum(characters_found(session.run(None, {"images": page[None]})[0], b, r)
                   for page, b, r in zip(pages, boxes, ratios, strict=True))

    before = found(path)
    assert before >= 40, f"fp32 finds {before} of 48"  # 43 of 48 measured
    out, report = folder / "det_q.onnx", folder / "det_q.json"
    code, _, err, _ = run_cli("quantize", path, "-o", out, "--calibration", folder / "det_calib.npz", "--eval",
                              folder / "det_eval.npz", "--json", report)
    data = outcome(code, report, err)
    after = found(out)
    if code == 0:
        assert after >= before, f"exit 0 finding {after} characters of 48 against the input's {before}"
        assert next(c for c in data["candidates"] if c["scheme"] == data["chosen"])["speedup_vs_fp32"] > 1.0
    else:
        assert after == before

