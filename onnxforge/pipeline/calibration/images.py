"""Samples from a folder of images: each file decoded with Pillow and preprocessed as declared
(resize, scale, mean/std per channel, NCHW/NHWC), one file at a time."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxforge.errors import CalibrationDataError, UsageError
from onnxforge.model_io import TensorSpec
from onnxforge.pipeline.calibration.samples import StreamedSamples

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "ImageLayout",
    "ImagePreprocessing",
    "image_files",
    "is_image_folder",
    "stream_images",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageLayout(enum.Enum):
    AUTO = "auto"  # from the model input: channels (1 or 3) on axis 1 = NCHW, on the last axis = NHWC
    NCHW = "nchw"
    NHWC = "nhwc"


@dataclass(frozen=True, kw_only=True)
class ImagePreprocessing:
    """How an image file becomes a model input: resize to ``size`` (height, width; None = the
    model input's fixed H and W), convert to RGB (3 channels) or grayscale (1), multiply by
    ``scale``, subtract ``mean`` and divide by ``std`` per channel, lay out as ``layout``.

    The one description of image preprocessing: calibration and evaluation folders read images
    with it (``DataSpec.image``) and merge's ``ImagePre`` builds its graph block from it, so the
    normalization a model is calibrated with is the one it ships with."""

    size: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: ImageLayout = ImageLayout.AUTO

    def __post_init__(self) -> None:
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise UsageError(f"image_size {self.size}: expected [height, width], both at least 1")
        if not self.mean or not self.std:
            raise UsageError("mean and std need at least one value")
        if any(s == 0 for s in self.std):
            raise UsageError("std: every value must be non-zero")
        if self.scale == 0:
            raise UsageError("scale must be non-zero")


@dataclass(frozen=True)
class ImageFolder:
    """A folder of image files (searched recursively, sorted by path) and their preprocessing."""

    path: Path
    preprocessing: ImagePreprocessing = ImagePreprocessing()


def image_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def is_image_folder(path: Path) -> bool:
    """A folder read as images: it holds image files (searched recursively) and no .npz/.npy file,
    which would make it a folder of arrays. The one place this is decided."""
    path = Path(path)
    return (
        path.is_dir()
        and not any(p.suffix in (".npz", ".npy") for p in path.iterdir())
        and any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in path.rglob("*"))
    )


def _resolve_image_geometry(spec: TensorSpec, pre: ImagePreprocessing, where: str) -> tuple[ImageLayout, int, int, int]:
    if len(spec.shape) != 4:
        raise CalibrationDataError(f"{where}: images need a rank-4 model input; {spec.name!r} is {spec.shape_text()}")
    layout = pre.layout
    _, a1, _, a3 = spec.shape
    if layout is ImageLayout.AUTO:
        if a1 in (1, 3):
            layout = ImageLayout.NCHW
        elif a3 in (1, 3):
            layout = ImageLayout.NHWC
        else:
            raise CalibrationDataError(
                f"{where}: cannot tell the layout of input {spec.name!r} ({spec.shape_text()})",
                hint="declare it: layout nchw or nhwc (--layout)",
            )
    if layout is ImageLayout.NCHW:
        c, h, w = spec.shape[1], spec.shape[2], spec.shape[3]
    else:
        c, h, w = spec.shape[3], spec.shape[1], spec.shape[2]
    if c not in (1, 3):
        raise CalibrationDataError(f"{where}: input {spec.name!r} has {c} channels; images give 1 or 3")
    if pre.size is not None:
        h, w = pre.size
    if not (isinstance(h, int) and isinstance(w, int)):
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} has dynamic height/width ({spec.shape_text()})",
            hint="declare the size to resize images to (--image-size HxW)",
        )
    for name, values in (("mean", pre.mean), ("std", pre.std)):
        if len(values) not in (1, c):
            raise CalibrationDataError(f"{where}: {name} has {len(values)} values; the input has {c} channels")
    return layout, c, h, w


def stream_images(folder: ImageFolder, specs: Sequence[TensorSpec]) -> StreamedSamples:
    """An image folder as a StreamedSamples of one sample per file, decoded one file at a time."""
    path = Path(folder.path)
    if len(specs) != 1:
        raise CalibrationDataError(
            f"{path}: images can feed only a single-input model; this one has {', '.join(s.name for s in specs)}"
        )
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationDataError(
            f"{path}: reading images needs Pillow, which is not installed",
            hint="pip install pillow (or onnxforge[images])",
        ) from None
    files = image_files(path)
    if not files:
        raise CalibrationDataError(f"{path}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    spec = specs[0]
    pre = folder.preprocessing
    layout, channels, height, width = _resolve_image_geometry(spec, pre, str(path))
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    if spec.dtype.kind != "f":
        raise CalibrationDataError(f"{path}: input {spec.name!r} takes {spec.dtype}; images are fed as float")

    def read(f: Path, start: int = 0, stop: int = 1) -> dict[str, np.ndarray]:  # one sample per file
        try:
            with Image.open(f) as opened:
                image = opened.convert("RGB" if channels == 3 else "L")
                image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except Exception as e:
            raise CalibrationDataError(f"{f}: not a readable image ({type(e).__name__})") from e
        pixels = pixels.reshape(height, width, channels) * np.float32(pre.scale)
        pixels = (pixels - mean) / std
        if layout is ImageLayout.NCHW:
            pixels = pixels.transpose(2, 0, 1)
        return {spec.name: np.ascontiguousarray(pixels[None].astype(spec.dtype))}

    return StreamedSamples(str(path), files, read, lambda f: 1)
