"""The task ddddocr's reader exists for: read a captcha. Captchas are drawn by ``captcha``'s ImageCaptcha
(220 x 70, its built-in DroidSansMono, noise dots and a curve), seeded; a captcha counts as read when the
decoded text equals the text drawn, letter case aside (the reader answers "Uv3s" for "uv3s": its classes hold
both cases of a letter, and captchas like these are checked without case).

Preprocessing and decoding are ddddocr's own (``core/ocr_engine.py``, the ``beta=True`` engine that loads
``common.onnx``): the image resized to height 64 keeping its aspect (LANCZOS; 220 x 70 -> 201 x 64), then
grayscale, scaled to [0, 1], fed as ``input1 [1, 1, 64, W]``. The model returns raw scores ``[T, 1, 8210]``
(its declared output ``[1, seqlen]`` is not what it returns): the argmax per step, repeats merged, index 0 (blank)
dropped, each index looked up in ``CHARSET_BETA`` (``ddddocr/charsets.py``, read as data, not imported).

captcha 0.7.1 draws its randomness from ``secrets``, which no seed reaches (``random.seed`` changes
nothing): ``captcha_images`` swaps the module's ``secrets`` for a seeded ``random.Random`` while it draws.
"""

from __future__ import annotations

import ast
import contextlib
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# lowercase letters and digits without the glyphs DroidSansMono draws alike under ImageCaptcha's warp (g/q/9,
# i/j/l/1, o/0): with all 36 the fp32 reader read 38 of 64 (seed 1), without them 58 and 52 (seeds 1, 2)
ALPHABET = "abcdefhkmnprstuvwxyz2345678"
LENGTH = 4
SIZE = (220, 70)  # ImageCaptcha's default 160 x 60 crowds 4 characters: 38 and 35 of 64 read
HEIGHT = 64  # ddddocr's default model reads 64 px high lines


class _SeededSecrets(random.Random):
    """The three ``secrets`` functions captcha.image calls, from a seeded generator."""

    def randbelow(self, n: int) -> int:
        return self.randrange(n)

    def randbits(self, k: int) -> int:
        return self.getrandbits(k)


@contextlib.contextmanager
def _seeded_captcha(seed: int) -> Iterator[None]:
    import captcha.image as image_module

    saved = image_module.secrets
    image_module.secrets = _SeededSecrets(seed)  # type: ignore[assignment]
    try:
        yield
    finally:
        image_module.secrets = saved


def captcha_texts(count: int, seed: int, length: int = LENGTH) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(length)) for _ in range(count)]


def captcha_images(texts: list[str], seed: int) -> list:
    """PIL images of ``texts`` as ImageCaptcha draws them, the same for the same seed."""
    from captcha.image import ImageCaptcha

    with _seeded_captcha(seed):
        generator = ImageCaptcha(width=SIZE[0], height=SIZE[1])
        return [generator.generate_image(text) for text in texts]


def reader_input(image) -> np.ndarray:
    """ddddocr's preprocessing of one image: ``[1, 1, 64, W]`` float32 in [0, 1]."""
    from PIL import Image

    width = int(image.size[0] * (HEIGHT / image.size[1]))
    gray = image.resize((width, HEIGHT), Image.LANCZOS).convert("L")
    return (np.asarray(gray, np.float32) / 255.0)[None, None]


def captcha_inputs(texts: list[str], seed: int) -> np.ndarray:
    """``[N, 1, 1, 64, W]``: one batch-1 input per captcha (the model's batch is fixed at 1; all
    images are SIZE, so W is the same for all)."""
    return np.stack([reader_input(image) for image in captcha_images(texts, seed)])


def charset(package_dir: Path) -> list[str]:
    """ddddocr's ``CHARSET_BETA`` (the characters of common.onnx's 8210 classes; index 0 is the blank ''),
    parsed from ``charsets.py`` as a literal."""
    tree = ast.parse((package_dir / "charsets.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CHARSET_BETA":
            return ast.literal_eval(node.value)
    raise LookupError(f"{package_dir / 'charsets.py'} defines no CHARSET_BETA")


def read_text(scores: np.ndarray, characters: list[str]) -> str:
    """ddddocr's decoding of one captcha's scores (``[T, 1, C]``, or ``[1, T, C]`` / ``[T, C]``): argmax per
    step, repeats merged, blank (0) dropped."""
    steps = np.asarray(scores).reshape(-1, np.asarray(scores).shape[-1]).argmax(-1)
    chars, previous = [], None
    for index in steps:
        if index != previous and index != 0:
            chars.append(characters[index])
        previous = index
    return "".join(chars)


def captchas_read(outputs: list[np.ndarray], characters: list[str], texts: list[str]) -> int:
    """How many captchas read exactly (letter case aside)."""
    return sum(read_text(o, characters).lower() == t.lower() for o, t in zip(outputs, texts, strict=True))
