"""The OCR task the PP-OCR models exist for, on rendered text: read lines, find lines, orient lines.

Text is drawn with Pillow's built-in scalable font (no font files needed): lines of words and numbers,
black on white. The recognizer's answer is decoded greedily (CTC) with the character dictionary the
model carries in its metadata; a line counts when it is read exactly. A page's line counts as found
when exactly one region of the detector's probability map (> 0.3) lies inside its box and spans at
least 60% of its width. The direction classifier's answer is right when it says 0 for an upright line
and 180 for the same line upside down. Preprocessing is PaddleOCR's (rapidocr's): the recognizer takes
48 px high lines padded to 320 px, normalised to [-1, 1]; the detector ImageNet-normalised pages.
"""

from __future__ import annotations

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

WORDS = ["invoice", "total", "amount", "date", "order", "street", "number", "price", "model", "onnx", "forge",
         "line", "text", "paper", "report", "delta", "alpha", "quick", "brown", "fox"]


def text_lines(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(1, 4))]
        lines.append(" ".join([*words, str(rng.integers(10, 99999))]))
    return lines


def render_line(text: str, size: int = 32) -> Image.Image:
    font = ImageFont.load_default(size=size)
    _, _, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right + 16, bottom + 12), (255, 255, 255))
    ImageDraw.Draw(image).text((8, 4), text, font=font, fill=(0, 0, 0))
    return image


def line_input(image: Image.Image, height: int = 48, width: int = 320) -> np.ndarray:
    scaled = min(width, int(np.ceil(height * image.width / image.height)))
    array = np.asarray(image.resize((scaled, height), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :scaled] = (array - 0.5) / 0.5
    return out


def recognizer_inputs(texts: list[str]) -> np.ndarray:
    return np.stack([line_input(render_line(t)) for t in texts])


def characters(model_path) -> list[str]:
    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def read_lines(probabilities: np.ndarray, alphabet: list[str]) -> list[str]:
    """Greedy CTC: the best class per step, repeats merged, blanks dropped."""
    texts = []
    for row in probabilities.argmax(-1):
        chars, previous = [], -1
        for index in row:
            if index != previous and index != 0:
                chars.append(alphabet[index])
            previous = index
        texts.append("".join(chars))
    return texts


def lines_read(probabilities: np.ndarray, alphabet: list[str], texts: list[str]) -> int:
    return sum(got == want for got, want in zip(read_lines(probabilities, alphabet), texts, strict=False))


def page(seed: int, height: int = 480, width: int = 640, lines: int = 6) -> tuple[np.ndarray, list[tuple]]:
    """A page of text lines, ImageNet-normalised CHW, and each line's box (left, top, right, bottom)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    boxes, top = [], 20
    for text in text_lines(lines, seed):
        font = ImageFont.load_default(size=int(rng.integers(20, 34)))
        left = int(rng.integers(10, 120))
        box = draw.textbbox((left, top), text, font=font)
        if box[2] >= width - 5 or box[3] >= height - 5:
            break
        draw.text((left, top), text, font=font, fill=(0, 0, 0))
        boxes.append(box)
        top = box[3] + int(rng.integers(20, 45))
    array = np.asarray(image, np.float32) / 255.0
    array = (array - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return array.transpose(2, 0, 1).astype(np.float32), boxes


def lines_found(probability: np.ndarray, boxes: list[tuple], threshold: float = 0.3) -> int:
    labels, _ = ndimage.label(probability > threshold)
    regions = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)]
    found = 0
    for left, top, right, bottom in boxes:
        inside = [
            r for r in regions if r[0] >= left - 4 and r[2] <= right + 4 and r[1] >= top - 4 and r[3] <= bottom + 4
        ]
        found += len(inside) == 1 and inside[0][2] - inside[0][0] >= 0.6 * (right - left)
    return found


def classifier_inputs(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Lines at 48 x 192, upright then the same lines turned 180 degrees, and the right answers (0, 1)."""
    upright = np.stack([line_input(render_line(t), 48, 192) for t in texts])
    turned = np.stack([line_input(render_line(t).rotate(180), 48, 192) for t in texts])
    return np.concatenate([upright, turned]), np.array([0] * len(texts) + [1] * len(texts))
