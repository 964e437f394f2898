"""Pre-processing blocks: raw integer data in, the network's float input out, prepended to the network.

Images (``ImagePre``): uint8 pixels, one image ``[H, W, C]`` / ``[C, H, W]`` or a batch
``[N, H, W, C]`` / ``[N, C, H, W]``, at a fixed or dynamic size, become

    y = resize(x) * (scale / std) + (-mean / std)        per channel c, in the network's layout

which is ``(resize(x) * scale - mean) / std`` folded into one multiply and one add. Resize is ONNX
``Resize`` with ``half_pixel`` coordinates (bilinear, or nearest rounding halves down) to the network's
H x W, and only where the input size can differ from it. Audio (``AudioPre``): int16 samples become
``x * scale`` (1/32768: full scale maps to [-1, 1)).

Each block also has the same steps in numpy (``reference``), which the merge's parity check runs
beside the merged graph, and the inverse (``raw_from``), which turns evaluation data stored as the
network's float input back into the raw integers a deployed model receives.

In recipes a pre-processing block is written ``pre: image`` or ``pre: {image: {layout: hwc, ...}}``
(``audio`` likewise): one spelling that says which kind it is.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import MergeError, RecipeError, UsageError
from onnxforge.model_io import TensorSpec, input_specs
from onnxforge.pipeline import codec
from onnxforge.pipeline.calibration import ImageLayout, ImagePreprocessing
from onnxforge.pipeline.merge._compose import block_model, spec_info, value_info

__all__ = [
    "AudioPlan",
    "AudioPre",
    "ImagePlan",
    "ImagePre",
    "PixelLayout",
    "ResizeMode",
    "plan_preprocessing",
]


class PixelLayout(enum.Enum):
    """How one raw image is laid out: height, width, channels (what image files decode to) or channels first."""

    HWC = "hwc"
    CHW = "chw"


class ResizeMode(enum.Enum):
    LINEAR = "linear"
    NEAREST = "nearest"


@dataclass(frozen=True, kw_only=True)
class ImagePre:
    """uint8 images -> the network's float image input (see the module docstring).

    ``size``: the raw images' fixed H x W (default: the network's); ``dynamic_size``: any H x W,
    resized to the network's. ``input``: the network input it feeds (default: its only 4-D input);
    ``network_layout``: that input's layout (auto: channels of 1, 3 or 4 on axis 1 = NCHW, else last).

    ``scale``, ``mean``, ``std`` and ``network_layout`` are the ``ImagePreprocessing`` calibration
    data declares (``preprocessing``; ``from_preprocessing`` builds the block from one, and a recipe's
    merge takes them from its image calibration): what calibrates is what ships. ``layout``,
    ``batched``, ``size``, ``dynamic_size`` and ``resize`` describe the raw images, merge's own.
    """

    layout: PixelLayout = PixelLayout.HWC
    batched: bool = True
    size: tuple[int, int] | None = None
    dynamic_size: bool = False
    resize: ResizeMode = ResizeMode.LINEAR
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    network_layout: ImageLayout = ImageLayout.AUTO
    input: str | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise MergeError(f"image size {self.size}: expected two positive numbers, height and width")
        if self.size is not None and self.dynamic_size:
            raise MergeError("an image input has a fixed size or a dynamic size, not both",
                             hint="drop size, or drop dynamic_size")
        try:  # the normalization is checked where it is described: non-zero std and scale, a value each
            ImagePreprocessing(scale=self.scale, mean=self.mean, std=self.std, layout=self.network_layout)
        except UsageError as e:
            raise MergeError(f"image pre-processing: {e.message}") from e

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """The normalization this block applies, as image calibration data declares it (resized to the
        network's own size, hence ``size`` None)."""
        return ImagePreprocessing(scale=self.scale, mean=self.mean, std=self.std, layout=self.network_layout)

    @classmethod
    def from_preprocessing(cls, preprocessing: ImagePreprocessing, **raw: Any) -> ImagePre:
        """The block that ships ``preprocessing`` (a calibration's image options) for raw images
        described by ``raw`` (``layout``, ``batched``, ``size``, ``dynamic_size``, ``resize``, ``input``)."""
        return cls(scale=preprocessing.scale, mean=preprocessing.mean, std=preprocessing.std,
                   network_layout=preprocessing.layout, **raw)


# bytes per raw pixel while checking: the uint8 image, the graph's float32 copy, numpy's float64 reference
_CHECK_BYTES_PER_PIXEL = 1 + 4 + 8


def _check_fits(sizes: list[tuple[int, int]], batch: int, channels: int) -> None:
    """Refuse (exit 2) an image size whose parity-check images cannot fit in the memory available now."""
    from onnxforge.pipeline.quantize.memory_plan import available_memory

    available = available_memory()
    if available is None:
        return
    for h, w in sizes:
        need = batch * h * w * channels * _CHECK_BYTES_PER_PIXEL
        if need > available // 2:
            raise MergeError(f"image size {h}x{w}: checking the merged model on {batch} such images needs "
                             f"{need / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB is available",
                             hint="give the size the deployed model receives (--size HxW), or use --dynamic-size")


@dataclass(frozen=True, kw_only=True)
class AudioPre:
    """int16 samples -> float samples ``x * scale``, fed to ``input`` (default: the network's only input)."""

    scale: float = 1.0 / 32768.0
    input: str | None = None

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise MergeError("audio scale must be non-zero")


# ----------------------------------------------------------------------------------------------
# Plans: the options resolved against one network input


def _network_input(network: onnx.ModelProto, wanted: str | None, rank: int | None, kind: str) -> TensorSpec:
    specs = input_specs(network)
    if wanted is not None:
        found = [s for s in specs if s.name == wanted]
        if not found:
            raise MergeError(f"{kind} pre-processing: the model has no input {wanted!r}; "
                             f"its inputs are {', '.join(s.name for s in specs)}")
        spec = found[0]
    else:
        fitting = [s for s in specs if rank is None or len(s.shape) == rank]
        if len(fitting) != 1:
            raise MergeError(f"{kind} pre-processing: cannot tell which input it feeds among "
                             f"{', '.join(s.name for s in specs)}", hint="name it: input=NAME (--input NAME)")
        spec = fitting[0]
    if spec.dtype.kind != "f":
        raise MergeError(f"{kind} pre-processing feeds a float input; {spec.name!r} is {spec.dtype}")
    if rank is not None and len(spec.shape) != rank:
        raise MergeError(f"image pre-processing feeds a 4-D image input; {spec.name!r} has shape {spec.shape_text()}")
    return spec


@dataclass(frozen=True)
class ImagePlan:
    """``ImagePre`` resolved against the network's image input: the raw input, the steps, the constants."""

    pre: ImagePre
    network_input: TensorSpec
    raw_input: TensorSpec  # uint8, same name as the network input it replaces
    perm: tuple[int, ...] | None  # raw batch layout -> network layout
    channels_last: bool  # the network's layout is NHWC
    resize_to: tuple[int, int] | None
    multiplier: np.ndarray  # float32, broadcast over the network layout
    offset: np.ndarray

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self.raw_input]

    @property
    def fed(self) -> list[str]:
        return [self.network_input.name]

    def block(self, like: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
        """The block (raw input -> ``NAME/pixels``) and its io_map onto the network."""
        name = self.raw_input.name

        def v(step: str) -> str:  # the block's own names: never the raw input's (it takes the network input's name)
            return f"{name}/{step}"

        # Built here rather than with onnxruntime-extensions' pre_post_processing steps, block by block as
        # measured by benchmarks/merge_library.py (2026-12-07, 224x224 RGB, batch 1, interleaved):
        # - layout + uint8 -> float (ChannelsLastToChannelsFirst, ImageBytesToFloat): the same Transpose,
        #   Cast, Mul, equal outputs, 1.00x. Nothing to gain in the graph, while building through the
        #   library imports onnxruntime_extensions (it imports transformers: +2.8 s CPU per process, and
        #   sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python), adds a com.microsoft.extensions opset
        #   import and converts the graph it runs on to its own opset (17 -> 18).
        # - normalize (Normalize): Cast, Mul, Sub, Div where ours folds scale, mean and std into one Mul and
        #   one Add: 1.27-1.28x slower (two runs), and 3 channels only.
        # - resize (Resize + CenterCrop): another operation (keeps the aspect ratio and crops, antialiases
        #   at opset 18; max abs 0.39 from ours on a 320 -> 224 downscale) and 3.1-3.5x slower.
        # All of these library steps produce standard ONNX ops only: the choice is not about deployability.

        nodes, inits = [], []
        x = name
        if not self.pre.batched:
            inits.append(numpy_helper.from_array(np.array([0], np.int64), v("batch_axis")))
            nodes.append(helper.make_node("Unsqueeze", [x, v("batch_axis")], [v("batched")]))
            x = v("batched")
        if self.perm is not None:
            nodes.append(helper.make_node("Transpose", [x], [v("transposed")], perm=list(self.perm)))
            x = v("transposed")
        nodes.append(helper.make_node("Cast", [x], [v("as_float")], to=TensorProto.FLOAT))
        x = v("as_float")
        if self.resize_to is not None:
            keep = [(0, 1), (3, 4)] if self.channels_last else [(0, 2)]
            pieces = []
            nodes.append(helper.make_node("Shape", [x], [v("shape")]))
            for i, (start, end) in enumerate(keep):
                inits += [numpy_helper.from_array(np.array([start], np.int64), v(f"start{i}")),
                          numpy_helper.from_array(np.array([end], np.int64), v(f"end{i}"))]
                nodes.append(helper.make_node("Slice", [v("shape"), v(f"start{i}"), v(f"end{i}")], [v(f"kept{i}")]))
                pieces.append(v(f"kept{i}"))
            inits.append(numpy_helper.from_array(np.array(self.resize_to, np.int64), v("target_hw")))
            pieces.insert(1, v("target_hw"))
            nodes.append(helper.make_node("Concat", pieces, [v("sizes")], axis=0))
            nodes.append(helper.make_node(
                "Resize", [x, "", "", v("sizes")], [v("resized")], mode=self.pre.resize.value,
                coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor"))
            x = v("resized")
        inits.append(numpy_helper.from_array(self.multiplier, v("multiplier")))
        nodes.append(helper.make_node("Mul", [x, v("multiplier")], [v("scaled")]))
        x = v("scaled")
        if np.any(self.offset):
            inits.append(numpy_helper.from_array(self.offset, v("offset")))
            nodes.append(helper.make_node("Add", [x, v("offset")], [v("normalized")]))
            x = v("normalized")
        to = helper.np_dtype_to_tensor_dtype(self.network_input.dtype)
        nodes.append(helper.make_node("Cast", [x], [v("pixels")], to=to))
        out_shape = list(self.network_input.shape)
        out_shape[0] = self.raw_input.shape[0] if self.pre.batched else 1
        model = block_model("image_pre", nodes, [spec_info(self.raw_input)],
                            [value_info(v("pixels"), self.network_input.dtype, out_shape)], like, initializers=inits)
        return model, [(v("pixels"), self.network_input.name)]

    def reference(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The same steps in numpy: raw feeds -> the network's feeds."""
        x = np.asarray(raw[self.raw_input.name])
        x = x if self.pre.batched else x[None]
        if self.perm is not None:
            x = x.transpose(self.perm)
        x = x.astype(np.float32)
        if self.resize_to is not None:
            axes = (1, 2) if self.channels_last else (2, 3)
            for axis, length in zip(axes, self.resize_to, strict=False):
                x = _resize_axis(x, axis, length, self.pre.resize)
        y = (x * self.multiplier + self.offset).astype(self.network_input.dtype)
        return {self.network_input.name: y}

    def raw_from(self, network_feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Evaluation data stored as the network's input -> uint8 images (None where a resize sits
        between them: a resized image cannot be un-resized). Always with a sample axis."""
        if self.resize_to is not None:
            return None
        y = np.asarray(network_feeds[self.network_input.name], dtype=np.float64)
        raw = np.clip(np.rint((y - self.offset) / self.multiplier), 0, 255).astype(np.uint8)
        if self.perm is not None:
            raw = raw.transpose(np.argsort(self.perm))
        return {self.raw_input.name: raw}

    def examples(self, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        """Random raw inputs for the parity check: every size the input takes (two for a dynamic size)."""
        net_hw = self._net_hw()
        sizes = [self.pre.size or net_hw or (32, 32)]
        if self.pre.dynamic_size or (net_hw is None and self.pre.size is None):
            h, w = sizes[0]
            sizes.append((h * 3 // 2 + 1, max(1, w * 3 // 4 + 3)))
        batch = self.raw_input.shape[0] if isinstance(self.raw_input.shape[0], int) else 2
        _check_fits(sizes, batch, self._channels())
        feeds = []
        for h, w in sizes:
            c = self._channels()
            shape = (h, w, c) if self.pre.layout is PixelLayout.HWC else (c, h, w)
            full = (batch, *shape) if self.pre.batched else shape
            feeds.append({self.raw_input.name: rng.integers(0, 256, size=full, dtype=np.uint8)})
        return feeds

    def _net_hw(self) -> tuple[int, int] | None:
        dims = self.network_input.shape[1:3] if self.channels_last else self.network_input.shape[2:4]
        h, w = dims[0], dims[1]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def _channels(self) -> int:
        c = self.network_input.shape[3 if self.channels_last else 1]
        if not isinstance(c, int):  # _plan_image refuses a dynamic channel count
            raise MergeError(f"image pre-processing: {self.network_input.name!r} has a dynamic channel count")
        return c


def _resize_axis(x: np.ndarray, axis: int, length: int, mode: ResizeMode) -> np.ndarray:
    """ONNX Resize along one axis, half_pixel coordinates: source = (i + 0.5) / scale - 0.5."""
    size = x.shape[axis]
    if size == length:
        return x
    source = (np.arange(length, dtype=np.float64) + 0.5) * (size / length) - 0.5
    if mode is ResizeMode.NEAREST:
        return np.take(x, np.clip(np.ceil(source - 0.5), 0, size - 1).astype(np.int64), axis=axis)
    source = np.clip(source, 0, size - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    shape = [1] * x.ndim
    shape[axis] = length
    weight = (source - low).reshape(shape)
    return np.take(x, low, axis=axis) * (1 - weight) + np.take(x, high, axis=axis) * weight


def _plan_image(pre: ImagePre, network: onnx.ModelProto) -> ImagePlan:
    spec = _network_input(network, pre.input, 4, "image")
    dims = spec.shape
    norm = pre.preprocessing
    layout: ImageLayout | None = norm.layout
    if layout is ImageLayout.AUTO:
        layout = (ImageLayout.NCHW if dims[1] in (1, 3, 4) else ImageLayout.NHWC if dims[3] in (1, 3, 4) else None)
        if layout is None:
            raise MergeError(f"image pre-processing: cannot tell the layout of {spec.name!r} "
                             f"({spec.shape_text()})", hint="set network_layout: nchw or nhwc (--network-layout)")
    channels_last = layout is ImageLayout.NHWC
    c = dims[3] if channels_last else dims[1]
    if not isinstance(c, int):
        raise MergeError(f"image pre-processing: {spec.name!r} has a dynamic channel count ({spec.shape_text()})")
    for label, values in (("mean", norm.mean), ("std", norm.std)):
        if len(values) not in (1, c):
            raise MergeError(f"image {label} has {len(values)} values; {spec.name!r} has {c} channels")
    net_hw = (dims[1], dims[2]) if channels_last else (dims[2], dims[3])
    net_h, net_w = net_hw
    static_hw = (net_h, net_w) if isinstance(net_h, int) and isinstance(net_w, int) else None
    batch = dims[0]
    if not pre.batched and isinstance(batch, int) and batch != 1:
        raise MergeError(f"a single-image input cannot feed {spec.name!r}, whose batch is fixed at {batch}",
                         hint="use a batched input (batched: true)")
    if pre.dynamic_size:
        raw_hw: tuple = ("height", "width")
        resize_to = static_hw
    elif pre.size is not None:
        raw_hw = tuple(pre.size)
        resize_to = static_hw if static_hw is not None and static_hw != raw_hw else None
    else:
        raw_hw = tuple(net_hw)
        resize_to = None
    hwc = pre.layout is PixelLayout.HWC
    image_shape = (*raw_hw, c) if hwc else (c, *raw_hw)
    raw_shape = (batch, *image_shape) if pre.batched else image_shape
    # raw batch layout (N,H,W,C) or (N,C,H,W) -> network layout
    perm = None
    if hwc != channels_last:
        perm = (0, 3, 1, 2) if hwc else (0, 2, 3, 1)
    mean = np.asarray(norm.mean, np.float64)
    std = np.asarray(norm.std, np.float64)
    shape = [1, 1, 1, -1] if channels_last else [1, -1, 1, 1]
    multiplier = (norm.scale / std).astype(np.float32).reshape(shape)
    offset = (-mean / std).astype(np.float32).reshape(shape)
    multiplier, offset = np.broadcast_arrays(multiplier, offset)
    return ImagePlan(pre, spec, TensorSpec(spec.name, tuple(raw_shape), np.dtype(np.uint8)), perm, channels_last,
                     resize_to, np.ascontiguousarray(multiplier), np.ascontiguousarray(offset))


@dataclass(frozen=True)
class AudioPlan:
    """``AudioPre`` resolved against the network's audio input."""

    pre: AudioPre
    network_input: TensorSpec
    raw_input: TensorSpec  # int16, same name and shape

    @property
    def inputs(self) -> list[TensorSpec]:
        return [self.raw_input]

    @property
    def fed(self) -> list[str]:
        return [self.network_input.name]

    @property
    def _to(self) -> int:
        return helper.np_dtype_to_tensor_dtype(self.network_input.dtype)

    def block(self, like: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
        name = self.raw_input.name
        nodes = [  # the block's own names start with the raw input's, which is the network input's name
            helper.make_node("Cast", [name], [f"{name}/as_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{name}/as_float", f"{name}/scale"], [f"{name}/scaled"]),
            helper.make_node("Cast", [f"{name}/scaled"], [f"{name}/samples"], to=self._to),
        ]
        inits = [numpy_helper.from_array(np.array(self.pre.scale, np.float32), f"{name}/scale")]
        model = block_model("audio_pre", nodes, [spec_info(self.raw_input)],
                            [spec_info(self.network_input, f"{name}/samples")], like, initializers=inits)
        return model, [(f"{name}/samples", self.network_input.name)]

    def reference(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(raw[self.raw_input.name]).astype(np.float32)
        return {self.network_input.name: (x * np.float32(self.pre.scale)).astype(self.network_input.dtype)}

    def raw_from(self, network_feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        y = np.asarray(network_feeds[self.network_input.name], dtype=np.float64)
        return {self.raw_input.name: np.clip(np.rint(y / self.pre.scale), -32768, 32767).astype(np.int16)}

    def examples(self, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        shape = tuple(d if isinstance(d, int) else (2 if i == 0 else 1600) for i, d in enumerate(self.raw_input.shape))
        return [{self.raw_input.name: rng.integers(-32768, 32768, size=shape, dtype=np.int16)}]


def _plan_audio(pre: AudioPre, network: onnx.ModelProto) -> AudioPlan:
    spec = _network_input(network, pre.input, None, "audio")
    return AudioPlan(pre, spec, TensorSpec(spec.name, spec.shape, np.dtype(np.int16)))


def plan_preprocessing(pre: ImagePre | AudioPre, network: onnx.ModelProto) -> ImagePlan | AudioPlan:
    """Resolve ``pre`` against ``network``'s inputs; MergeError when it cannot feed them."""
    return _plan_image(pre, network) if isinstance(pre, ImagePre) else _plan_audio(pre, network)


# ----------------------------------------------------------------------------------------------
# Recipe spelling: {image: {...}} or {audio: {...}} (or just "image" / "audio")

_KINDS: dict[str, type] = {"image": ImagePre, "audio": AudioPre}


def _encode(value: ImagePre | AudioPre) -> dict[str, Any]:
    kind = next(k for k, cls in _KINDS.items() if isinstance(value, cls))
    return {kind: {f.name: codec.encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}


def _decode(value: Any, where: str, base: Path | None) -> ImagePre | AudioPre:
    if isinstance(value, str) and value in _KINDS:
        return _KINDS[value]()
    if isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in _KINDS:
        kind, options = next(iter(value.items()))
        return codec.decode_dataclass(_KINDS[kind], options or {}, f"{where}.{kind}", base)
    raise RecipeError(
        f"{where}: expected image, audio, {{image: {{options}}}} or {{audio: {{options}}}}; got {value!r}")


# One decoder for both: a union ImagePre | AudioPre tries ImagePre's first, and it must also read audio.
for _cls in _KINDS.values():
    codec.register_type(_cls, _encode, _decode)
