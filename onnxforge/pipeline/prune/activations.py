"""A model's intermediate values on samples, batch by batch: what activation importance, the
sensitivity scan, the least-squares repair and data-aware low rank measure."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxforge.model_io import input_specs
from onnxforge.pipeline.calibration import SampleSet, model_batch_size
from onnxforge.targets.cpu import CpuTarget

__all__ = ["batches_of_values", "value_batches"]


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


def batches_of_values(
    model: onnx.ModelProto, samples: SampleSet, names: list[str], batch: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first sample index, {name: value}) for each full batch of ``samples`` (``value_batches`` of them)."""
    session = CpuTarget().session(_with_outputs(model, names))
    fixed = model_batch_size(input_specs(model), preferred=-1)
    batch = fixed if fixed > 0 else batch
    for start, feeds in zip(range(0, len(samples), batch), samples.batches(batch), strict=False):
        n = samples.feeding.batch_size(feeds)
        if fixed > 0 and n != fixed:
            continue  # a fixed-batch model cannot take a short last batch
        yield start, dict(zip(names, session.run(names, feeds), strict=True))


def value_batches(model: onnx.ModelProto, samples: SampleSet, batch: int) -> int:
    """How many batches ``batches_of_values`` yields: a fixed-batch model's own batch, whole batches only."""
    fixed = model_batch_size(input_specs(model), preferred=-1)
    return len(samples) // fixed if fixed > 0 else -(-len(samples) // batch)
