"""The task ddddocr's detector (``common_det.onnx``, a YOLOX: ``images [1, 3, 416, 416]`` -> ``[1, 3549, 6]``)
exists for: find the characters of a click captcha. A page is 320 x 160, a plain light background with 4
characters (DroidSansMono, captcha's font, 28-40 px, dark) at seeded places that never overlap; a
character counts as found when a detection with score > 0.5 has its centre inside the character's box.

Preprocessing and decoding are ddddocr's (``core/detection_engine.py``): BGR pixels 0-255, resized to fit
416 x 416 and padded with 114; each row's centre and size decoded on the strides 8, 16 and 32 grids; its
score is objectness x class score. (ddddocr then applies NMS at 0.45; a centre test needs none.) fp32
found 59 of 64 characters on pages 100-115.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

SIZE = (320, 160)
LETTERS = "ABCDEFHKMNPRSTUVWXYZ"
INPUT = 416


def _font_path() -> Path:
    import captcha

    return Path(captcha.__file__).parent / "data" / "DroidSansMono.ttf"


def click_page(seed: int, characters: int = 4):
    """(PIL image, each character's box (left, top, right, bottom))."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    image = Image.new("RGB", SIZE, tuple(rng.randint(150, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(characters):
        font = ImageFont.truetype(str(_font_path()), rng.randint(28, 40))
        char = LETTERS[rng.randrange(len(LETTERS))]
        for _ in range(50):  # a place clear of the others
            x, y = rng.randrange(5, SIZE[0] - 45), rng.randrange(5, SIZE[1] - 50)
            box = draw.textbbox((x, y), char, font=font)
            if all(box[2] < b[0] - 4 or box[0] > b[2] + 4 or box[3] < b[1] - 4 or box[1] > b[3] + 4 for b in boxes):
                break
        draw.text((x, y), char, font=font, fill=tuple(rng.randint(0, 90) for _ in range(3)))
        boxes.append(tuple(int(v) for v in box))  # type: ignore[arg-type]
    return image, boxes


def detector_input(image) -> tuple[np.ndarray, float]:
    """ddddocr's preprocessing: ``[3, 416, 416]`` float32 BGR 0-255, padded with 114; and the scale used."""
    from PIL import Image

    bgr = np.asarray(image)[:, :, ::-1]
    ratio = min(INPUT / bgr.shape[0], INPUT / bgr.shape[1])
    resized = np.asarray(Image.fromarray(bgr).resize((int(bgr.shape[1] * ratio), int(bgr.shape[0] * ratio)),
                                                     Image.BILINEAR))
    padded = np.full((INPUT, INPUT, 3), 114, np.uint8)
    padded[:resized.shape[0], :resized.shape[1]] = resized
    return padded.transpose(2, 0, 1).astype(np.float32), ratio


def click_pages(seeds) -> tuple[np.ndarray, list[list[tuple]], list[float]]:
    """``[N, 3, 416, 416]`` inputs, each page's boxes and its scale."""
    pages = [click_page(seed) for seed in seeds]
    inputs = [detector_input(image) for image, _ in pages]
    return np.stack([x for x, _ in inputs]), [b for _, b in pages], [r for _, r in inputs]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    cells, strides = [], []
    for stride in (8, 16, 32):
        side = INPUT // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        cells.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    return np.concatenate(cells), np.concatenate(strides)


def characters_found(output: np.ndarray, boxes: list[tuple], ratio: float, threshold: float = 0.5) -> int:
    """How many of a page's ``boxes`` hold the centre of a detection scoring above ``threshold``
    (``output``: the detector's ``[1, 3549, 6]`` for the page)."""
    cells, strides = _grid()
    rows = np.asarray(output, np.float64).reshape(-1, 6)
    centres = (rows[:, :2] + cells) * strides / ratio
    centres = centres[rows[:, 4] * rows[:, 5] > threshold]
    return sum(any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for x, y in centres) for b in boxes)
