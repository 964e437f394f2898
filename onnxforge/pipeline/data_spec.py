"""Where calibration and evaluation samples come from, as config: a path and how to read it; and the
one function that opens it.

A recipe spells it as a plain path (``calibration: calib.npz``) or as a mapping with the same
options the CLI has (``calibration: {path: images/, image_size: [224, 224], mean: [0.485, 0.456,
0.406], std: [0.229, 0.224, 0.225]}``). It goes through the config codec like every stage config,
so its options are saved in the manifest and are part of the cache key (with the data's sha256).

Every data field of every stage config (``calibration_data``, ``eval_data``, ``sample_data``) is a
``DataSpec``; the Python API also takes a plain ``str``/``Path`` there (``as_data_spec``). Every
consumer — calibration readers, prune's fit, eval scoring, distillation — opens it with
``open_data`` (lazily, bounded by ``limit``) or ``load_data`` (in memory), so an image folder with
its preprocessing reads the same everywhere.
"""

from __future__ import annotations

import enum
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from onnxforge.errors import CalibrationDataError, OnnxForgeError, RecipeError, UsageError
from onnxforge.model_io import TensorSpec
from onnxforge.pipeline import codec
from onnxforge.pipeline.calibration.files import (
    array_files,
    materialize_checked,
    open_samples,
    stream_file,
    stream_folder,
)
from onnxforge.pipeline.calibration.images import (
    ImageFolder,
    ImageLayout,
    ImagePreprocessing,
    is_image_folder,
    stream_images,
)
from onnxforge.pipeline.calibration.samples import SampleSet, StreamedSamples

__all__ = [
    "DataKind",
    "DataSource",
    "DataSpec",
    "as_data_spec",
    "data_spec_from_options",
    "load_data",
    "open_data",
    "set_data_fields",
]


class DataKind(enum.Enum):
    AUTO = "auto"  # images when image options are given or the folder holds images and no .npz/.npy, else arrays
    ARRAYS = "arrays"  # .npz / .npy file, or a folder of them, keyed by input name
    IMAGES = "images"  # a folder of image files, preprocessed as ``image`` says


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Samples for calibration or evaluation: ``path``, what it holds, and for image folders their
    preprocessing (``image``; None: the defaults, and the folder's content decides the kind)."""

    path: Path
    kind: DataKind = DataKind.AUTO
    image: ImagePreprocessing | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.kind is DataKind.ARRAYS and self.image is not None:
            raise UsageError(f"{self.path}: image options (image_size, mean, std, scale, layout) apply to images only",
                             hint="drop them, or set kind: images")

    def __str__(self) -> str:  # messages name the data by its path
        return str(self.path)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """How images are read: as declared, else the defaults (pixels scaled to [0, 1])."""
        return self.image if self.image is not None else ImagePreprocessing()

    def resolved_kind(self) -> DataKind:
        if self.kind is not DataKind.AUTO:
            return self.kind
        if self.image is not None or is_image_folder(self.path):
            return DataKind.IMAGES
        return DataKind.ARRAYS


DataSource = DataSpec | str | os.PathLike


@overload
def as_data_spec(value: DataSource) -> DataSpec: ...
@overload
def as_data_spec(value: None) -> None: ...
@overload
def as_data_spec(value: DataSource | None) -> DataSpec | None: ...


def as_data_spec(value: DataSource | None) -> DataSpec | None:
    """A config's data field as a DataSpec: a ``str``/``Path`` is ``DataSpec(path=value)``."""
    if value is None or isinstance(value, DataSpec):
        return value
    if isinstance(value, (str, os.PathLike)):
        return DataSpec(path=Path(value))
    raise UsageError(f"data: expected a path or a DataSpec, got {type(value).__name__}")


def set_data_fields(config: object, *names: str) -> None:
    """For a frozen config's ``__post_init__``: its data fields ``names`` as DataSpecs (the Python API
    may pass a ``str`` or ``Path`` there)."""
    for name in names:
        object.__setattr__(config, name, as_data_spec(getattr(config, name)))


def data_spec_from_options(
    path: str | os.PathLike,
    *,
    kind: DataKind | str = DataKind.AUTO,
    image_size: tuple[int, int] | str | None = None,
    scale: float | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    layout: ImageLayout | str | None = None,
) -> DataSpec:
    """A DataSpec from flat options as a command line gives them: ``--calibration DIR --image-size
    224x224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --layout nchw`` (text as typed, or
    values). Any image option given (a layout other than auto included) declares the images'
    preprocessing; options left None keep ImagePreprocessing's defaults. UsageError names the flag."""
    if isinstance(image_size, str):
        try:
            h, w = (int(v) for v in image_size.lower().split("x"))
        except ValueError:
            raise UsageError(f"--image-size {image_size!r}: expected HxW, e.g. 224x224") from None
        image_size = (h, w)
    given: dict[str, Any] = {"size": image_size, "scale": scale, "mean": _floats(mean, "--mean"),
                             "std": _floats(std, "--std"),
                             "layout": None if layout in (None, ImageLayout.AUTO, "auto")
                             else _choice(ImageLayout, layout, "--layout")}
    given = {k: v for k, v in given.items() if v is not None}
    return DataSpec(path=Path(path), kind=_choice(DataKind, kind, "kind"),
                    image=ImagePreprocessing(**given) if given else None)


def _floats(value: Sequence[float] | str | None, flag: str) -> tuple[float, ...] | None:
    try:
        if isinstance(value, str):
            return tuple(float(v) for v in value.split(","))
        return None if value is None else tuple(float(v) for v in value)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: expected comma-separated numbers") from None


def _choice(cls: type[enum.Enum], value: Any, flag: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: expected one of {', '.join(str(m.value) for m in cls)}") from None


def open_data(
    data: DataSource, specs: Sequence[TensorSpec], *, limit: int | None = None, equal_shapes: bool = False
) -> StreamedSamples:
    """``data`` for a model with inputs ``specs``, opened lazily: headers are read, samples only as
    the stream is iterated (a folder one file at a time, an image one file at a time), and at most
    the first ``limit`` of them. ``equal_shapes``: refuse folders whose files differ in a dynamic dim
    (stages that fit on stacked arrays); otherwise such files read as a ragged set."""
    spec = as_data_spec(data)
    if spec.resolved_kind() is DataKind.IMAGES:
        stream = stream_images(ImageFolder(spec.path, spec.preprocessing), specs)
    elif equal_shapes:
        stream = open_samples(spec.path, specs)
    elif spec.path.is_dir():
        if not array_files(spec.path) and spec.kind is DataKind.AUTO:
            raise CalibrationDataError(f"{spec.path}: folder holds no .npz, .npy or image files")
        stream = stream_folder(spec.path, specs)
    else:
        stream = stream_file(spec.path, specs)
    return stream if limit is None else stream.take(slice(0, limit))


def load_data(
    data: DataSource,
    specs: Sequence[TensorSpec],
    *,
    limit: int | None = None,
    min_samples: int = 1,
    want_labels: bool = False,
    allow_ragged: bool = False,
) -> SampleSet:
    """The first ``limit`` samples of ``data`` (all when None) in memory, checked: at least
    ``min_samples``, labels when ``want_labels``, one shape per input unless ``allow_ragged``."""
    return materialize_checked(open_data(data, specs), min_samples=min_samples, want_labels=want_labels,
                               allow_ragged=allow_ragged, limit=limit)


# ----------------------------------------------------------------------------------------------
# The codec spelling: a plain path, or a flat mapping {path, kind, image_size, scale, mean, std, layout}

_IMAGE_KEYS = {"image_size": "size", "scale": "scale", "mean": "mean", "std": "std", "layout": "layout"}


def _decode(value: Any, where: str, base: Path | None) -> DataSpec:
    if isinstance(value, DataSpec):
        return value
    if isinstance(value, (str, os.PathLike)):
        value = {"path": os.fspath(value)}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a path or a mapping with 'path', got {value!r}")
    if "path" not in value:
        raise RecipeError(f"{where}: 'path' is required")
    known = ["path", "kind", *_IMAGE_KEYS]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(ImagePreprocessing)
    image = {field: codec.decode(hints[field], value[key], f"{where}.{key}", base)
             for key, field in _IMAGE_KEYS.items() if key in value}
    try:
        return DataSpec(
            path=codec.decode(Path, value["path"], f"{where}.path", base),
            kind=codec.decode(DataKind, value.get("kind", "auto"), f"{where}.kind", base),
            image=ImagePreprocessing(**image) if image else None,
        )
    except RecipeError:
        raise
    except OnnxForgeError as e:
        raise RecipeError(f"{where}: {e.message}", hint=e.hint) from e


def _encode(spec: DataSpec) -> Any:
    # A plain path when every option is the default, as a recipe would write it; else the flat mapping.
    if spec.kind is DataKind.AUTO and spec.image is None:
        return codec.encode(spec.path)
    out = {"path": codec.encode(spec.path), "kind": spec.kind.value}
    if spec.image is not None:
        out.update({key: codec.encode(getattr(spec.image, field)) for key, field in _IMAGE_KEYS.items()})
    return out


codec.register_type(DataSpec, _encode, _decode)
