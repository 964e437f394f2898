"""ddddocr's captcha reader and detector (MIT; ``pip install ddddocr captcha``): the realworld benchmark's
captcha rows (``python -m benchmarks.realworld captcha`` runs them alone). Quality is the task's own:
captchas read exactly, characters of click-captcha pages found (tests/realworld/captcha_*task.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from benchmarks._stage_outcome import session, speed, stage, time_to_result, verdict

_TASK = Path(__file__).resolve().parents[1] / "tests" / "realworld"



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
        runner = session(path)
        got = [read_text(runner.run(None, {"input1": x[None]})[0], characters).lower() for x in images]
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
        with time_to_result() as took:
            code, result = stage(fn, *args)
        after = read(out)
        lost = sorted(before - after)
        rows.append(["ddddocr captcha reader", name, verdict(code, result), speed(result),
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
    np.savez(folder / "captcha_det_eval.npz", images=pages)
    np.savez(folder / "captcha_det_calib.npz", images=click_pages(range(200, 216))[0])

    def found(path) -> int:
        runner = session(path)
        return sum(characters_found(runner.run(None, {"images": page[None]})[0], b, r)
                   for page, b, r in zip(pages, boxes, ratios, strict=True))

    out = folder / "captcha_det_q.onnx"
    with time_to_result() as took:
        code, result = stage(quantize, detector, out, folder / "captcha_det_calib.npz",
                              QuantizeConfig(eval_data=folder / "captcha_det_eval.npz"))
    row = ["ddddocr detector", "quantize", verdict(code, result), speed(result),
           f"characters found {found(detector)} -> {found(out)} of {sum(map(len, boxes))}; took {took[0]:.0f} s "
           f"({took[1]:.0f} CPU-s)"]
    return [row], []
