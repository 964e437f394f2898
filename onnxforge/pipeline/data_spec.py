"""Where calibration and evaluation samples come from, as config: a path and how to read it.

A recipe spells it as a plain path (``calibration: calib.npz``) or as a mapping with the same
options the CLI has (``calibration: {path: images/, image_size: [224, 224], mean: [0.485, 0.456,
0.406], std: [0.229, 0.224, 0.225]}``). It goes through the config codec like every stage config,
so its options are saved in the manifest and are part of the cache key (with the data's sha256).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxforge.errors import RecipeError, UsageError
from onnxforge.pipeline import codec
from onnxforge.pipeline.calibration import IMAGE_SUFFIXES, ImageFolder, ImageLayout, ImagePreprocessing

__all__ = ["DataKind", "DataSpec"]


class DataKind(enum.Enum):
    AUTO = "auto"  # images when the folder holds images and no .npz/.npy, else arrays
    ARRAYS = "arrays"  # .npz / .npy file, or a folder of them, keyed by input name
    IMAGES = "images"  # a folder of image files, preprocessed as the options say


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Samples for calibration or evaluation. Image options apply to image folders only."""

    path: Path
    kind: DataKind = DataKind.AUTO
    image_size: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: ImageLayout = ImageLayout.AUTO

    def __post_init__(self) -> None:
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise UsageError(f"image_size {self.image_size}: expected [height, width], both at least 1")
        if any(s == 0 for s in self.std):
            raise UsageError("std: every value must be non-zero")

    @property
    def has_image_options(self) -> bool:
        return (self.image_size, self.scale, self.mean, self.std, self.layout) != (
            None, 1.0 / 255.0, (0.0,), (1.0,), ImageLayout.AUTO)

    def resolved_kind(self) -> DataKind:
        if self.kind is not DataKind.AUTO:
            return self.kind
        if self.has_image_options:
            return DataKind.IMAGES
        path = self.path
        if path.is_dir() and not any(p.suffix in (".npz", ".npy") for p in path.iterdir()) and any(
            p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")
        ):
            return DataKind.IMAGES
        return DataKind.ARRAYS

    def source(self) -> Path | ImageFolder:
        """What the calibration readers take: the path itself, or an ImageFolder with its preprocessing."""
        if self.resolved_kind() is DataKind.IMAGES:
            return ImageFolder(self.path, ImagePreprocessing(
                size=self.image_size, scale=self.scale, mean=self.mean, std=self.std, layout=self.layout))
        return self.path


def _decode(value: Any, where: str, base: Path | None) -> DataSpec:
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a path or a mapping with 'path', got {value!r}")
    if "path" not in value:
        raise RecipeError(f"{where}: 'path' is required")
    return codec.decode_dataclass(DataSpec, value, where, base)


def _encode(spec: DataSpec) -> Any:
    # A plain path when every option is the default, as a recipe would write it.
    options = {f.name: codec.encode(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    if spec == DataSpec(path=spec.path):
        return options["path"]
    return options


codec.register_type(DataSpec, _encode, _decode)
