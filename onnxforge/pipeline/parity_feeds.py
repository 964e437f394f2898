"""The inputs a parity check runs on: the user's samples when given, else a stated guess.

Simplify and fp16 compare their output with their input on two feeds. Real samples come first:
N(0,1) inputs fail correct models whose activations are large (an ImageNet CNN) and cannot take
a model down the branch its real inputs take. Without data, dynamic non-batch dims get a guessed
size, and the description says which shapes were chosen and how to choose others.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxforge.model_io import input_specs
from onnxforge.pipeline.data_spec import DataSource, load_data
from onnxforge.targets.feeds import generate_feeds

__all__ = ["parity_feeds"]


def parity_feeds(
    model: onnx.ModelProto, data: DataSource | None, input_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[dict[str, np.ndarray]], str]:
    """(feeds, what they are): two batches of one sample of ``data``, else two seeded N(0,1) feeds."""
    specs = input_specs(model)
    if data is not None:
        samples = load_data(data, specs, allow_ragged=True, limit=2)  # what parity runs on
        count = min(2, len(samples))
        feeds = [samples.take(slice(i, i + 1)).first_batch(1) for i in range(count)]
        return feeds, f"{count} sample(s) of {data}"
    feeds = [generate_feeds(specs, batch=1, overrides=input_shapes, seed=s, guess=True, model=model) for s in (1, 2)]
    shapes = "; ".join(f"{k} {'x'.join(map(str, v.shape)) or 'scalar'}" for k, v in feeds[0].items())
    guessed = any(
        not s.is_static and s.name not in input_shapes and len(s.shape) > 1
        and any(not isinstance(d, int) for d in s.shape[1:])
        for s in specs
    )
    hint = "; dynamic dims guessed: --input-shape or --data to choose" if guessed else ""
    return feeds, f"random N(0,1) inputs ({shapes}{hint})"
