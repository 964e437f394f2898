"""Real models nobody here wrote: PaddleOCR's PP-OCRv4 detector and recognizer and its opset-11 direction
classifier (real weights, from the ``rapidocr-onnxruntime`` wheel) and silero-vad (real weights, from
``silero-vad``). Each stage either keeps a model within
tolerance, timed against its input, or exits 4 with its numbers; quality is the task's own (lines of
rendered text read or found, direction answers, speech probabilities), measured here on held-out
inputs.

``python -m benchmarks realworld`` (``pip install 'onnxforge[realworld]'``, or ONNXFORGE_REALWORLD_SITE
pointing at a site-packages folder that has them); writes benchmarks/results/realworld.json.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks._common import markdown_table, peak_rss_mb, write_results

_TASK = Path(__file__).resolve().parents[1] / "tests" / "realworld"  # the task checks the tests use too


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _stage(fn, *args):
    """(exit code, result JSON) of a library stage: 0 with its result, 4 with the numbers it raised."""
    from onnxforge.errors import QualityGateError

    try:
        return 0, fn(*args).to_json()
    except QualityGateError as e:
        return 4, e.result or {}


@contextlib.contextmanager
def _time_to_result() -> Iterator[list[float]]:
    """[wall seconds, CPU seconds of this process's threads] of the block, filled in when it ends."""
    took: list[float] = [0.0, 0.0]
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        yield took
    finally:
        end = resource.getrusage(resource.RUSAGE_SELF)
        took[0] = time.perf_counter() - start
        took[1] = end.ru_utime - usage.ru_utime + end.ru_stime - usage.ru_stime


def _speed(result: dict) -> str:
    speed = result.get("measured_speedup")
    if speed is None and result.get("candidates"):
        chosen = next((c for c in result["candidates"] if c["scheme"] == result.get("chosen")), {})
        speed = chosen.get("speedup_vs_fp32")
    if speed is None:
        return "-"
    return f"{speed:.2f}x" if speed >= 0.995 else f"{speed:.2f}x (slower)"


def _verdict(code: int, result: dict) -> str:
    if code == 4:
        if result.get("tried"):
            return "exit 4: no try met the tolerance (input kept)"
        return f"exit 4: best kept ({result['chosen']})" if result.get("chosen") else "exit 4: best kept"
    if result.get("chosen"):
        nothing = next((n for n in result.get("notes", []) if n.startswith("nothing was quantized")), None)
        if nothing is None:
            return f"kept {result['chosen']}"
        why = ": its layers are in If/Loop bodies" if "bodies" in nothing else ""
        return f"kept {result['chosen']} (nothing quantized{why})"
    if "factored_layers" in result:
        return f"{len(result['factored_layers'])} layers factored"
    return f"{result.get('ratio', 0):.0%} of channels removed"


def run() -> dict:
    sys.path.insert(0, str(_TASK))
    from ocr_task import characters, classifier_inputs, lines_found, lines_read, page, recognizer_inputs, text_lines
    from realworld_models import model_path

    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, prune_channels
    from onnxforge.pipeline.prune.low_rank import LowRankConfig, low_rank
    from onnxforge.pipeline.quantize import QuantizeConfig, quantize

    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="bench-realworld-") as tmp:
        folder = Path(tmp)
        rec = model_path("ppocr_rec")
        if rec is None:
            skipped.append("PP-OCRv4 recognizer: rapidocr-onnxruntime not installed")
        else:
            texts = text_lines(50, seed=1)
            images, alphabet = recognizer_inputs(texts), characters(rec)
            np.savez(folder / "rec.npz", x=recognizer_inputs(text_lines(80, seed=5)))
            before = lines_read(_session(rec).run(None, {"x": images})[0], alphabet, texts)
            for name, fn, config in (
                ("low-rank", low_rank, LowRankConfig(calibration_data=folder / "rec.npz")),
                ("quantize", lambda i, o, c: quantize(i, o, folder / "rec.npz", c), QuantizeConfig()),
            ):
                out = folder / f"rec_{name}.onnx"
                with _time_to_result() as took:  # issue 23: time to result, wall and CPU (the host is shared)
                    code, result = _stage(fn, rec, out, config)
                after = lines_read(_session(out).run(None, {"x": images})[0], alphabet, texts)
                rows.append(["PP-OCRv4 recognizer", name, _verdict(code, result), _speed(result),
                             f"lines read {before} -> {after} of {len(texts)}; took {took[0]:.0f} s "
                             f"({took[1]:.0f} CPU-s)"])
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
            import json

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
        for block in (captcha_rows, captcha_detector_rows):
            captcha, missing = block(folder)
            rows, skipped = rows + captcha, skipped + missing
    table = markdown_table(["model", "stage", "result", "speed vs input", "quality (task)"], rows)
    if skipped:
        table += "\n\nSkipped: " + "; ".join(skipped)
    print(table)
    write_results("realworld", {"rows": rows, "skipped": skipped, "table": table})
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# ddddocr's captcha reader (its own block: ``python -m benchmarks.realworld captcha`` runs it alone)


def captcha_rows(folder: Path, count: int = 32) -> tuple[list[list[str]], list[str]]:
    """Rows for ddddocr's captcha reader (``common.onnx``, MIT): quantize and low-rank with the default gates
    and with the task itself as the metric (``captcha_metric.py:score`` on text labels, tolerance 0); captchas
    read before and after, on ``count`` held-out ImageCaptcha captchas (captcha_task.py)."""
    sys.path.insert(0, str(_TASK))
    from captcha_task import captcha_inputs, captcha_texts, charset, read_text
    from realworld_models import model_path

    from onnxforge.pipeline.prune.low_rank import LowRankConfig, low_rank
    from onnxforge.pipeline.quantize import QuantizeConfig, quantize
    from onnxforge.pipeline.user_metric import parse_user_metric

    reader = model_path("captcha_ocr")
    if reader is None:
        return [], ["ddddocr captcha reader: ddddocr not installed"]
    try:
        texts = captcha_texts(count, seed=1)
        images = captcha_inputs(texts, seed=1)[:, 0]
        calibration = captcha_inputs(captcha_texts(16, seed=7), seed=7)[:, 0]
    except ImportError:
        return [], ["ddddocr captcha reader: captcha (the captcha generator) not installed"]
    np.savez(folder / "captcha_eval.npz", input1=images, label=np.array(texts))
    np.savez(folder / "captcha_calib.npz", input1=calibration)
    characters = charset(reader.parent)

    def read(path) -> set[str]:
        session = _session(path)
        got = [read_text(session.run(None, {"input1": x[None]})[0], characters).lower() for x in images]
        return {t for t, g in zip(texts, got, strict=True) if g == t}

    before = read(reader)
    task = parse_user_metric(str(_TASK / "captcha_metric.py") + ":score")
    data = {"calibration_data": folder / "captcha_calib.npz", "eval_data": folder / "captcha_eval.npz"}
    stages = (
        ("quantize", quantize, QuantizeConfig(eval_data=data["eval_data"])),
        ("quantize, task metric", quantize, QuantizeConfig(eval_data=data["eval_data"], metric=task, tolerance=0.0)),
        ("low-rank", low_rank, LowRankConfig(**data)),
        ("low-rank, task metric", low_rank, LowRankConfig(**data, metric=task, tolerance=0.0)),
    )
    rows = []
    for index, (name, fn, config) in enumerate(stages):
        out = folder / f"captcha_{index}.onnx"
        args = (reader, out, data["calibration_data"], config) if fn is quantize else (reader, out, config)
        with _time_to_result() as took:
            code, result = _stage(fn, *args)
        after = read(out)
        lost = sorted(before - after)
        rows.append(["ddddocr captcha reader", name, _verdict(code, result), _speed(result),
                     f"captchas read {len(before)} -> {len(after)} of {count}"
                     + (f" ({len(lost)} the input read no longer read)" if lost else "")
                     + f"; took {took[0]:.0f} s ({took[1]:.0f} CPU-s)"])
    return rows, []


def captcha_detector_rows(folder: Path) -> tuple[list[list[str]], list[str]]:
    """A row for ddddocr's detector (``common_det.onnx``, MIT): quantize with the default gates; characters of
    16 held-out click-captcha pages found before and after (captcha_det_task.py)."""
    sys.path.insert(0, str(_TASK))
    from captcha_det_task import characters_found, click_pages
    from realworld_models import model_path

    from onnxforge.pipeline.quantize import QuantizeConfig, quantize

    detector = model_path("captcha_det")
    if detector is None:
        return [], ["ddddocr detector: ddddocr not installed"]
    try:
        pages, boxes, ratios = click_pages(range(100, 116))
    except ImportError:
        return [], ["ddddocr detector: captcha (its font draws the pages) not installed"]
    np.savez(folder / "det_eval.npz", images=pages)
    np.savez(folder / "det_calib.npz", images=click_pages(range(200, 216))[0])

    def found(path) -> int:
        session = _session(path)
        return sum(characters_found(session.run(None, {"images": page[None]})[0], b, r)
                   for page, b, r in zip(pages, boxes, ratios, strict=True))

    out = folder / "det_q.onnx"
    with _time_to_result() as took:
        code, result = _stage(quantize, detector, out, folder / "det_calib.npz",
                              QuantizeConfig(eval_data=folder / "det_eval.npz"))
    row = ["ddddocr detector", "quantize", _verdict(code, result), _speed(result),
           f"characters found {found(detector)} -> {found(out)} of {sum(map(len, boxes))}; took {took[0]:.0f} s "
           f"({took[1]:.0f} CPU-s)"]
    return [row], []


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
