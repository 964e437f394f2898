"""Real models nobody here wrote: PaddleOCR's PP-OCRv4 detector and recognizer and its opset-11 direction
classifier (real weights, from the ``rapidocr-onnxruntime`` wheel), silero-vad (real weights, from
``silero-vad``) and Keras MobileNetV2 (random weights, exported by onnxforge). Each stage either keeps
a model within tolerance, timed against its input, or exits 4 with its numbers; quality is the task's
own (lines of rendered text read or found, direction answers, speech probabilities; for the random
MobileNetV2 its own answers), measured here on held-out inputs. The recognizer is also quantized with
the task as its gate (a user metric: _realworld_recognizer).

``python -m benchmarks realworld`` (``pip install 'onnxforge[realworld]'``, or ONNXFORGE_REALWORLD_SITE
pointing at a site-packages folder that has them); writes benchmarks/results/realworld.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from benchmarks._common import markdown_table, peak_rss_mb, write_results
from benchmarks._realworld_captcha import captcha_detector_rows, captcha_rows
from benchmarks._realworld_mobilenet import mobilenet_rows
from benchmarks._realworld_recognizer import recognizer_rows
from benchmarks._stage_outcome import session as _session
from benchmarks._stage_outcome import speed as _speed
from benchmarks._stage_outcome import stage as _stage
from benchmarks._stage_outcome import verdict as _verdict

_TASK = Path(__file__).resolve().parents[1] / "tests" / "realworld"  # the task checks the tests use too


def _sample_load(into: list[float], stop: threading.Event, every_s: float = 15.0) -> None:
    while not stop.wait(every_s):
        into.append(os.getloadavg()[0])


def run() -> dict:
    sys.path.insert(0, str(_TASK))
    from ocr_task import classifier_inputs, lines_found, page, text_lines
    from realworld_models import model_path

    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, prune_channels
    from onnxforge.pipeline.quantize import QuantizeConfig, quantize

    rows, skipped = [], []
    load, done = [os.getloadavg()[0]], threading.Event()  # the host is shared: its load says what wall times mean
    threading.Thread(target=_sample_load, args=(load, done), daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="bench-realworld-") as tmp:
        folder = Path(tmp)
        rec = model_path("ppocr_rec")
        if rec is None:
            skipped.append("PP-OCRv4 recognizer: rapidocr-onnxruntime not installed")
        else:
            rows += recognizer_rows(folder, rec)
        det = model_path("ppocr_det")
        if det is None:
            skipped.append("PP-OCRv4 detector: rapidocr-onnxruntime not installed")
        else:
            held = [page(seed, 480, 640) for seed in range(8)]
            pages, boxes = np.stack([p for p, _ in held]), [b for _, b in held]
            np.savez(folder / "det.npz", x=np.stack([page(seed, 480, 640)[0] for seed in range(100, 124)]))

            def found(path) -> int:
                found_per_page = _session(path).run(None, {"x": pages})[0]
                return sum(lines_found(p[0], b) for p, b in zip(found_per_page, boxes, strict=False))

            before = found(det)
            out = folder / "det_channels.onnx"
            code, result = _stage(
                prune_channels, det, out, ChannelPruneConfig(ratio=0.3, calibration_data=folder / "det.npz")
            )
            best = max((t["score"] for t in result.get("tried", [])), default=None)
            rows.append(["PP-OCRv4 detector", "prune channels 0.3", _verdict(code, result), _speed(result),
                         f"lines found {before} -> {found(out)} of {sum(map(len, boxes))}"
                         + (f"; best try cosine {best:.3f}" if code == 4 and best is not None else "")])
            out = folder / "det_q.onnx"
            peak, printed = peak_rss_mb(
                "import json\nfrom onnxforge.errors import QualityGateError\n"
                "from onnxforge.pipeline.quantize import QuantizeConfig, quantize\n"
                f"try:\n    r = quantize({str(det)!r}, {str(out)!r}, {str(folder / 'det.npz')!r}, "
                "QuantizeConfig(max_memory=2 << 30)).to_json(); code = 0\n"
                "except QualityGateError as e:\n    r, code = e.result, 4\n"
                "print('RESULT', json.dumps({'code': code, 'result': r}))\n"
            )
            payload = json.loads(next(line for line in printed.splitlines() if line.startswith("RESULT"))[7:])
            rows.append(["PP-OCRv4 detector", "quantize --max-memory 2G", _verdict(payload["code"], payload["result"]),
                         _speed(payload["result"]), f"lines found {before} -> {found(out)}; peak {peak:.0f} MB"])
        cls = model_path("ppocr_cls")
        if cls is None:
            skipped.append("PP-OCR direction classifier: rapidocr-onnxruntime not installed")
        else:
            images, answers = classifier_inputs(text_lines(40, seed=3))
            np.savez(folder / "cls.npz", x=images)
            out = folder / "cls_q.onnx"
            code, result = _stage(lambda i, o, c: quantize(i, o, folder / "cls.npz", c), cls, out, QuantizeConfig())

            def right(path) -> float:
                return float((_session(path).run(None, {"x": images})[0].argmax(1) == answers).mean())

            rows.append(["PP-OCR direction classifier (opset 11)", "quantize", _verdict(code, result), _speed(result),
                         f"right answers {right(cls):.0%} -> {right(out):.0%}"])
        vad = model_path("silero_vad")
        if vad is None:
            skipped.append("silero-vad: not installed")
        else:
            from test_silero_vad import stream_samples

            x, s = stream_samples(vad)
            np.savez(folder / "vad.npz", input=x, state=s, **{"sr@const": np.array(16000)})

            def speech(path) -> np.ndarray:
                return _session(path).run(None, {"input": x, "state": np.ascontiguousarray(s.transpose(1, 0, 2)),
                                                 "sr": np.array(16000)})[0].ravel()

            out = folder / "vad_q.onnx"
            code, result = _stage(lambda i, o, c: quantize(i, o, folder / "vad.npz", c), vad, out, QuantizeConfig())
            delta = float(np.mean(np.abs(speech(out) - speech(vad))))
            rows.append(["silero-vad", "quantize", _verdict(code, result), _speed(result),
                         f"speech probability mean abs change {delta:.3f}"])
        keras_rows, why = mobilenet_rows(folder)
        rows += keras_rows
        if why:
            skipped.append(why)
        for block in (captcha_rows, captcha_detector_rows):
            captcha, missing = block(folder)
            rows, skipped = rows + captcha, skipped + missing
    done.set()
    table = markdown_table(["model", "stage", "result", "speed vs input", "quality (task)"], rows)
    table += (f"\n\nLoad average (1 min) {min(load):.1f}-{max(load):.1f} during the run (median {np.median(load):.1f}) "
              f"on {os.cpu_count()} cores: other jobs shared them, so wall times are inflated; speeds are p50 ratios "
              "timed interleaved.")
    if skipped:
        table += "\n\nSkipped: " + "; ".join(skipped)
    print(table)
    write_results("realworld", {"rows": rows, "skipped": skipped, "table": table, "load_average_samples": load})
    return {"rows": rows}


if __name__ == "__main__":
    if sys.argv[1:] == ["captcha"]:
        with tempfile.TemporaryDirectory(prefix="bench-captcha-") as tmp:
            captcha, missing = captcha_rows(Path(tmp))
            detector, absent = captcha_detector_rows(Path(tmp))
            captcha, missing = captcha + detector, missing + absent
        print(markdown_table(["model", "stage", "result", "speed vs input", "quality (task)"], captcha))
        print("\n".join(missing))
    else:
        run()
