"""The inputs a parity check runs: the user's sample ``.npz``, or generated arrays shaped like the
export's example inputs (or ``--input-shape``).

Every dynamic dim is exercised at two sizes, because an exporter can silently bake a size into
the graph (the TorchScript exporter does this to ``nn.TransformerEncoder``'s sequence length):
the first feed uses batch 1 and the example sizes; the second uses batch 3 and, for every other
named dynamic dim (e.g. ``sequence``), a different length. Inputs that share a dim name get the
same size. Integer inputs draw from the values seen in the example (token ids stay in the
vocabulary); masks are all ones, or padded like the example's when it had padding; floats are
standard normal.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onnxforge.errors import CalibrationDataError, UsageError
from onnxforge.model_io import TensorSpec
from onnxforge.targets.feeds import batch_from_samples

__all__ = ["PARITY_BATCHES", "parity_feeds", "sample_feeds"]

PARITY_BATCHES = (1, 3)


def _other_length(size: int) -> int:
    """A second length for a dynamic dim: shorter when there is room (never past a model's maximum)."""
    return size - max(1, size // 4) if size >= 3 else size + 1


def sample_feeds(path: Path, specs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
    """Feeds from a user's .npz keyed by input name: batch 1 and 3 when the batch is dynamic."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise CalibrationDataError(f"{path}: not a readable .npz ({type(e).__name__})") from e
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise CalibrationDataError(
            f"{path}: no array for model input {missing[0]!r} (has: {', '.join(arrays) or 'nothing'})"
        )
    chosen = {s.name: arrays[s.name].astype(s.dtype, copy=False) for s in specs}
    for spec in specs:
        array = chosen[spec.name]
        if array.ndim != len(spec.shape) or any(
            isinstance(d, int) and d != a for d, a in zip(spec.shape[1:], array.shape[1:], strict=True)
        ):
            raise CalibrationDataError(
                f"{path}: array {spec.name!r} has shape {'x'.join(map(str, array.shape))}, "
                f"the model input is {spec.shape_text()}"
            )
    dynamic_batch = any(s.shape and not isinstance(s.shape[0], int) for s in specs)
    if not dynamic_batch:
        return [{k: np.ascontiguousarray(v) for k, v in chosen.items()}]
    rows = min(len(v) for v in chosen.values())
    batches = sorted({1, min(PARITY_BATCHES[-1], rows)})
    return [batch_from_samples(chosen, b) for b in batches]


def _base_shape(spec: TensorSpec, examples: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> tuple:
    if spec.name in examples:
        return tuple(examples[spec.name].shape)
    if spec.name in shapes:
        return tuple(shapes[spec.name])
    return spec.shape


def parity_feeds(
    specs: list[TensorSpec],
    *,
    examples: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 1,
) -> list[dict[str, np.ndarray]]:
    """One feed per variant of the dynamic dims (one feed when every dim is fixed)."""
    examples = examples or {}
    input_shapes = input_shapes or {}
    base: dict[str, tuple] = {}
    sizes: dict[str, int] = {}  # dim name -> its example size
    for spec in specs:
        shape = _base_shape(spec, examples, input_shapes)
        if len(shape) != len(spec.shape):
            raise UsageError(
                f"input {spec.name!r}: rank {len(shape)} given, the model input has rank {len(spec.shape)}"
            )
        base[spec.name] = shape
        for axis, (declared, given) in enumerate(zip(spec.shape, shape, strict=True)):
            if isinstance(declared, int):
                continue
            key = declared if isinstance(declared, str) and declared else f"{spec.name}:{axis}"
            if isinstance(given, int):
                sizes.setdefault(key, given)
            elif axis != 0:
                raise UsageError(
                    f"input {spec.name!r} has dynamic dimension {axis} ({declared or '?'}) "
                    f"in shape {spec.shape_text()}",
                    hint=f"give it with --input-shape {spec.name}=..., or a --sample .npz",
                )
    batch_keys = {
        (s.shape[0] if isinstance(s.shape[0], str) and s.shape[0] else f"{s.name}:0")
        for s in specs
        if s.shape and not isinstance(s.shape[0], int)
    }
    dynamic = bool(batch_keys) or bool(sizes)
    variants: list[dict[str, int]] = []
    for index in range(2 if dynamic else 1):
        variant = {}
        for key, size in sizes.items():
            variant[key] = size if index == 0 else _other_length(size)
        for key in batch_keys:
            variant[key] = PARITY_BATCHES[index]
        variants.append(variant)

    rng = np.random.default_rng(seed)
    feeds = []
    for variant in variants:
        feed = {}
        for spec in specs:
            dims: list[int] = []
            for axis, (declared, given) in enumerate(zip(spec.shape, base[spec.name], strict=True)):
                if isinstance(declared, int):
                    dims.append(declared)
                else:
                    key = declared if isinstance(declared, str) and declared else f"{spec.name}:{axis}"
                    dims.append(variant.get(key, given if isinstance(given, int) else 1))
            feed[spec.name] = _values(spec, tuple(dims), examples.get(spec.name), rng)
        feeds.append(feed)
    return feeds


def _values(
    spec: TensorSpec, shape: tuple[int, ...], example: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    dtype = example.dtype if example is not None else spec.dtype
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b" or (dtype.kind in "iu" and "mask" in spec.name.lower()):
        if example is not None and len(shape) >= 2 and shape[-1] > 1 and not example.all():
            return _padding_mask(shape, dtype, rng)
        return np.ones(shape, dtype=dtype)
    if dtype.kind in "iu":
        if example is not None and example.size:
            return rng.choice(np.unique(example), size=shape).astype(dtype)
        return rng.integers(0, 100, size=shape).astype(dtype)
    raise UsageError(f"input {spec.name!r} has dtype {dtype}, which onnxforge cannot generate")


def _padding_mask(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """The example mask had padding, so pad here too: each row keeps a random prefix of ones (at
    least one; the first row none padded), the masked path of the model is exercised."""
    mask = np.ones(shape, dtype=dtype)
    rows = mask.reshape(-1, shape[-1])
    for i in range(1, rows.shape[0]):
        rows[i, rng.integers(1, shape[-1] + 1):] = 0
    return mask
