"""A user metric (``--metric captcha_metric.py:score``): the share of captchas read exactly (letter case
aside), each eval sample's ``label`` being the captcha's text, decoded as ddddocr decodes (captcha_task.py)."""

from __future__ import annotations

import numpy as np
from captcha_task import charset, read_text
from realworld_models import model_path


def score(outputs: dict[str, np.ndarray], labels: np.ndarray | None, reference: dict | None) -> float:
    if labels is None:
        raise ValueError("captcha_metric needs the captchas' texts as the eval data's 'label' array")
    reader = model_path("captcha_ocr")
    if reader is None:
        raise ValueError("ddddocr is not installed: its charset is not found")
    characters = charset(reader.parent)
    (scores,) = outputs.values()
    read = [read_text(s, characters).lower() == str(t).lower() for s, t in zip(scores, labels, strict=True)]
    return float(np.mean(read))
