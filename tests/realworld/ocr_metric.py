"""The recognizer's task as a quality gate: the share of text lines read exactly.

``onnxforge quantize REC.onnx ... --eval lines.npz --metric tests/realworld/ocr_metric.py:score
--tolerance 0.06`` keeps a candidate that reads at most 3 lines of 50 fewer than the input model.
``lines.npz`` holds the line images under the model's input name and the true texts under ``label``
(a numpy unicode array: ``np.array(texts)``, no pickle).

The answer is decoded greedily (CTC, ``ocr_task.read_lines``) with the character dictionary carried
in a PaddleOCR recognizer's metadata: the model named by ``ONNXFORGE_OCR_MODEL``, else PP-OCRv4's
recognizer from the installed ``rapidocr-onnxruntime``. The metric runs in onnxforge's child process,
which imports this file (and its neighbours) by path.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from ocr_task import characters, read_lines
from realworld_models import model_path

MODEL_ENV = "ONNXFORGE_OCR_MODEL"


@functools.cache
def alphabet() -> list[str]:
    path = os.environ.get(MODEL_ENV) or model_path("ppocr_rec")
    if path is None:
        raise RuntimeError(f"no recognizer to read the alphabet from: set {MODEL_ENV}=REC.onnx "
                           "or install rapidocr-onnxruntime")
    return characters(path)


def score(outputs: dict[str, np.ndarray], labels: np.ndarray | None, reference: dict | None) -> float:
    """Share of samples whose decoded line equals its label (higher is better)."""
    if labels is None:
        raise ValueError("the eval data needs a 'label' array of the true texts")
    (probabilities, *_) = outputs.values()  # the recognizer has one output: [N, T, classes]
    if probabilities.dtype == object:  # ragged widths: one [T, classes] array per sample
        read = [read_lines(np.asarray(p)[None], alphabet())[0] for p in probabilities]
    else:
        read = read_lines(probabilities, alphabet())
    return float(np.mean([got == str(want) for got, want in zip(read, labels, strict=True)]))
