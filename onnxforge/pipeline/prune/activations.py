"""A model's intermediate values on samples, batch by batch: what activation importance, the
sensitivity scan, the least-squares repair and data-aware low rank measure.

Padding: a batch of sentences padded to their longest carries pad tokens whose activations the model
never uses (the attention mask hides them and pooling skips them), yet they are rows like any other.
Each batch comes with its token mask (the feeds' rank-2 integer ``*mask`` input, e.g. ``attention_mask``,
nonzero = a real token) so statistics over tokens (``token_rows``) count only the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxforge.model_io import input_specs
from onnxforge.pipeline.calibration import SampleSet, model_batch_size
from onnxforge.targets.cpu import CpuTarget

__all__ = ["batches_of_values", "real_rows", "token_mask", "token_rows", "value_batches"]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """``model`` whose outputs are the values ``names`` (types from shape inference, default float)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = [*copy.graph.value_info, *copy.graph.output, *copy.graph.input]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in known}
    del copy.graph.output[:]
    for name in names:
        elem_type = types.get(name) or onnx.TensorProto.FLOAT
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return copy.SerializeToString()


def token_mask(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """[N, S] bool, True at real tokens: the feeds' rank-2 integer (or bool) input named ``*mask`` holding
    only 0 and 1; None when there is none (or more than one: which one masks the tokens is not known)."""
    found = [v for k, v in feeds.items() if k.lower().endswith("mask") and np.asarray(v).ndim == 2
             and (np.issubdtype(np.asarray(v).dtype, np.integer) or np.asarray(v).dtype == np.bool_)]
    if len(found) != 1 or not np.isin(found[0], (0, 1)).all():
        return None
    return np.asarray(found[0]) != 0


def real_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Which rows of ``x`` flattened to [R, D] are at real tokens: ``x`` is [N, S, ..., D] with ``mask``
    ([N, S]) on its first two axes, or [N*S, D] (the tokens already flattened); None for another layout."""
    if mask is None or x.ndim < 2:
        return None
    if x.ndim >= 3 and x.shape[:2] == mask.shape:
        return np.repeat(mask.ravel(), int(np.prod(x.shape[2:-1], dtype=np.int64)))
    if x.ndim == 2 and x.shape[0] == mask.size and mask.shape[1] > 1:
        return mask.ravel()
    return None


def token_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[R, D] rows of ``x`` (flattened over all but the last axis), only those at real tokens where
    ``real_rows`` knows the layout (another layout keeps every row)."""
    flat = x.reshape(-1, x.shape[-1])
    real = real_rows(x, mask)
    return flat if real is None else flat[real]


def batches_of_values(
    model: onnx.ModelProto, samples: SampleSet, names: list[str], batch: int
) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray | None]]:
    """(first sample index, {name: value}, token mask or None; see ``token_mask``) for each full batch
    of ``samples``."""
    session = CpuTarget().session(_with_outputs(model, names))
    fixed = model_batch_size(input_specs(model), preferred=-1)
    batch = fixed if fixed > 0 else batch
    for start, feeds in zip(range(0, len(samples), batch), samples.batches(batch), strict=False):
        n = samples.feeding.batch_size(feeds)
        if fixed > 0 and n != fixed:
            continue  # a fixed-batch model cannot take a short last batch
        yield start, dict(zip(names, session.run(names, feeds), strict=True)), token_mask(feeds)


def value_batches(model: onnx.ModelProto, samples: SampleSet, batch: int) -> int:
    """How many batches ``batches_of_values`` yields: a fixed-batch model's own batch, whole batches only."""
    fixed = model_batch_size(input_specs(model), preferred=-1)
    return len(samples) // fixed if fixed > 0 else -(-len(samples) // batch)
