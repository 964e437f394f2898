"""Input feeds for a model: parsed ``--input-shape`` values and generated or sampled arrays.

Generated data is deterministic (fixed seed). A dynamic first dimension takes the batch size;
any other dynamic dimension must be given with ``--input-shape`` (inputs that share a dim name share
its size: one input's shape gives the others'), except where the caller accepts
a stated guess (``guess=True``: simplify's parity and profile, which say the shapes they chose):
224 for the spatial dims of an image (rank 4, channels 1-4 first or last), 128 otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxforge.errors import UsageError
from onnxforge.model_io import TensorSpec

__all__ = ["batch_from_samples", "generate_feeds", "guessed_size", "id_bounds", "parse_input_dtypes",
           "parse_input_shapes", "resolve_shape"]

_MAX_FEED_BYTES = 4 << 30  # generated inputs larger than this are a damaged shape, not a benchmark


def _parse_input_arg(item: str) -> tuple[str, tuple[int, ...], np.dtype | None]:
    name, sep, rest = item.rpartition("=")
    if not sep or not name or not rest:
        raise UsageError(f"--input-shape {item!r}: expected NAME=DIMS, e.g. input=1x3x224x224")
    dims, _, dtype_text = rest.partition(":")
    try:
        shape = tuple(int(d) for d in dims.replace(",", "x").split("x"))
    except ValueError:
        raise UsageError(f"--input-shape {item!r}: dims must be integers separated by 'x'") from None
    if any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {item!r}: dims must be positive")
    dtype = None
    if dtype_text:
        try:
            dtype = np.dtype(dtype_text)
        except TypeError:
            raise UsageError(f"--input-shape {item!r}: unknown dtype {dtype_text!r}") from None
    return name, shape, dtype


def parse_input_shapes(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` items (also ``NAME=1,3,224,224``; a ``:dtype`` suffix is allowed)."""
    return {name: shape for name, shape, _ in map(_parse_input_arg, values)}


def parse_input_dtypes(values: Sequence[str]) -> dict[str, np.dtype]:
    """The dtypes given as ``NAME=1x128:int64``; inputs without a suffix are left out."""
    return {name: dtype for name, _, dtype in map(_parse_input_arg, values) if dtype is not None}


GUESSED_IMAGE_SIZE = 224
GUESSED_LENGTH = 128


def guessed_size(spec: TensorSpec, axis: int) -> int:
    """The stated guess for dynamic dim ``axis`` of ``spec``: 224 for an image side, 128 otherwise."""
    dims = spec.shape
    image = len(dims) == 4 and spec.dtype.kind == "f" and (
        (isinstance(dims[1], int) and dims[1] <= 4 and axis in (2, 3))
        or (isinstance(dims[3], int) and dims[3] <= 4 and axis in (1, 2)))
    return GUESSED_IMAGE_SIZE if image else GUESSED_LENGTH


def resolve_shape(
    spec: TensorSpec, batch: int, overrides: Mapping[str, tuple[int, ...]], *, guess: bool = False
) -> tuple[int, ...]:
    """The concrete shape to feed for ``spec`` (``guess``: a dynamic non-batch dim gets ``guessed_size``)."""
    if spec.name in overrides:
        shape = overrides[spec.name]
        if len(shape) != len(spec.shape):
            raise UsageError(
                f"--input-shape {spec.name}: rank {len(shape)} given, the model input has rank {len(spec.shape)}"
            )
        for given, declared in zip(shape, spec.shape, strict=True):
            if isinstance(declared, int) and declared != given:
                raise UsageError(
                    f"--input-shape {spec.name}={'x'.join(map(str, shape))} does not match the model's "
                    f"fixed shape {spec.shape_text()}"
                )
        return shape
    resolved = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            resolved.append(dim)
        elif axis == 0:
            resolved.append(batch)
        elif guess:
            resolved.append(guessed_size(spec, axis))
        else:
            raise UsageError(
                f"input {spec.name!r} has dynamic dimension {axis} ({dim or '?'}) in shape {spec.shape_text()}",
                hint=f"give it with --input-shape {spec.name}=" + "x".join(
                    str(d) if isinstance(d, int) else ("1" if i == 0 else "N") for i, d in enumerate(spec.shape)
                ),
            )
    return tuple(resolved)


_SMALL_INT = 100  # integer inputs that index no table we can see: 0..99
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}  # ids go through unchanged


def id_bounds(model: Any) -> dict[str, int]:
    """For each graph input that indexes an embedding table (``Gather(table, ids)``, axis 0, the table an
    initializer), possibly through Cast/Reshape/Unsqueeze/..., the smallest such table's first dim."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return {}
    tables = {init.name: init.dims[0] for init in graph.initializer if len(init.dims) >= 1}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    bounds: dict[str, int] = {}
    for graph_input in graph.input:
        seen, frontier = set(), [graph_input.name]
        while frontier:
            value = frontier.pop()
            for node in consumers.get(value, []):
                if node.op_type in _PASS_THROUGH and node.input[0] == value and id(node) not in seen:
                    seen.add(id(node))
                    frontier.extend(node.output)
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == value \
                        and node.input[0] in tables and _gather_axis(node) == 0:
                    limit = int(tables[node.input[0]])
                    bounds[graph_input.name] = min(bounds.get(graph_input.name, limit), limit)
    return bounds


def _gather_axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _shared_dims(specs: Sequence[TensorSpec], overrides: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes for inputs not given, from the sizes given for the dims they share by name: ``--input-shape
    input_ids=1x12`` makes an ``attention_mask`` of ``batch x sequence`` 1x12 too."""
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.name in overrides and len(overrides[spec.name]) == len(spec.shape):
            for declared, given in zip(spec.shape, overrides[spec.name], strict=True):
                if isinstance(declared, str) and declared:
                    sizes.setdefault(declared, given)
    shapes = {}
    for spec in specs:
        if spec.name in overrides or not any(isinstance(d, str) and d in sizes for d in spec.shape):
            continue
        dims = [d if isinstance(d, int) else sizes.get(d or "") for d in spec.shape]
        if all(d is not None for d in dims):
            shapes[spec.name] = tuple(int(d) for d in dims if d is not None)
    return shapes


def generate_feeds(
    specs: Sequence[TensorSpec],
    *,
    batch: int = 1,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    guess: bool = False,
    model: Any = None,
) -> dict[str, np.ndarray]:
    """Random inputs of the right shape and dtype: normal floats, small non-negative ints, ones for masks
    (``guess``: see ``resolve_shape``; the caller says which shapes it ran). Given the ``model``
    (a ModelProto), an integer input that indexes an embedding table (a Gather on an initializer)
    gets ids below the table's first dim: an id outside the vocabulary is an error in onnxruntime."""
    bounds = id_bounds(model)
    overrides = overrides or {}
    unknown = set(overrides) - {s.name for s in specs}
    if unknown:
        raise UsageError(
            f"--input-shape names {sorted(unknown)[0]!r}, which is not a model input; "
            f"inputs are: {', '.join(s.name for s in specs)}"
        )
    overrides = {**_shared_dims(specs, overrides), **overrides}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = resolve_shape(spec, batch, overrides, guess=guess)
        # a damaged or absurd declared shape (found by fuzzing: dims of -7 or 2**40) must not reach numpy
        if any(d < 0 for d in shape) or np.prod(shape, dtype=np.float64) * spec.dtype.itemsize > _MAX_FEED_BYTES:
            raise UsageError(
                f"input {spec.name!r} of shape {'x'.join(map(str, shape))} ({spec.dtype}) cannot be generated "
                f"(negative, or over {_MAX_FEED_BYTES >> 30} GiB)",
                hint=f"give a sensible shape with --input-shape {spec.name}=DIMS, or data with --data",
            )
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            if "mask" in spec.name.lower():
                feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
            else:
                high = max(1, bounds.get(spec.name, _SMALL_INT))
                feeds[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = np.ones(shape, dtype=bool)
        else:
            raise UsageError(f"input {spec.name!r} has dtype {spec.dtype}, which onnxforge cannot generate")
    return feeds


def batch_from_samples(samples: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of each array, repeated cyclically if there are fewer."""
    feeds = {}
    for name, array in samples.items():
        if len(array) >= batch:
            feeds[name] = np.ascontiguousarray(array[:batch])
        else:
            feeds[name] = np.ascontiguousarray(np.resize(array, (batch, *array.shape[1:])))
    return feeds
