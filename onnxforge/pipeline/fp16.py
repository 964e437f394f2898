"""FP16 conversion for GPU targets (CUDA, TensorRT), where half precision runs on tensor cores.

Rule: every float32 initializer and activation becomes float16, except where fp16 would lose the
value: onnxruntime's converter clamps weights into fp16's range, and ops that are numerically
fragile in fp16 or have no fp16 kernel (its default block list: Resize, Range, NonMaxSuppression,
TopK, ...) stay float32 behind Cast nodes. Inputs and outputs keep float32 (``keep_io_types``),
so callers feed the same arrays. The result must match the fp32 model within a loose tolerance
(fp16 has ~3 decimal digits), checked here on the CPU; on a CPU the fp16 model is slower — it is
a file for the GPU, not for this machine. Models past 2 GB are converted in memory and checked from
temporary files with external data (onnxforge.model_io); an already-quantized model is refused.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxforge._atomic import check_output_path, paths_in
from onnxforge.errors import InvalidModelError, OnnxForgeError, QualityGateError, first_line
from onnxforge.model_io import check_model, infer_shapes, save_model, serialized_size, stored_at
from onnxforge.parity import ParityReport, Tolerance, compare_models
from onnxforge.pipeline import codec
from onnxforge.pipeline.codec import option
from onnxforge.pipeline.data_spec import DataSpec, set_data_fields
from onnxforge.pipeline.normalize import load_stage_input
from onnxforge.pipeline.parity_feeds import parity_feeds

__all__ = ["Fp16Config", "Fp16Result", "convert_fp16", "to_fp16_model"]


_DEFAULT_TOLERANCE = Tolerance(atol=1e-2, rtol=1e-2)  # frozen: one shared default is safe


@dataclass(frozen=True, kw_only=True)
class Fp16Config:
    keep_io_types: bool = option(True, help="inputs and outputs stay fp32 (casts inside the graph)")
    op_block_list: tuple[str, ...] = option((), help="op types kept in fp32")
    input_shapes: Mapping[str, tuple[int, ...]] = option(default_factory=dict, help="input shapes for the parity check")
    sample_data: DataSpec | None = option(  # .npz keyed by input name: parity inputs instead of random ones
        None,
        help="parity inputs (instead of random data)",
    )
    tolerance: Tolerance = option(_DEFAULT_TOLERANCE, help="parity tolerance against fp32")

    def __post_init__(self) -> None:
        set_data_fields(self, "sample_data")  # a str or Path from the Python API becomes a DataSpec


@dataclass(kw_only=True)
class Fp16Result(codec.JsonResult):
    notes: list[str] = field(default_factory=list)  # what was normalized on load
    path: Path
    parity: ParityReport
    parity_inputs: str = ""  # what parity ran on: the user's samples, or random inputs of stated shapes
    bytes_before: int
    bytes_after: int


def to_fp16_model(model: onnx.ModelProto, config: Fp16Config = Fp16Config()) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = list(DEFAULT_OP_BLOCK_LIST) + list(config.op_block_list)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            # the converter changes the model it is given: infer_shapes returns a copy (of any size, where
            # the converter's own inference raises past 2 GB)
            converted = convert_float_to_float16(
                infer_shapes(model),
                keep_io_types=config.keep_io_types,
                op_block_list=blocked,
                disable_shape_infer=True,
            )
    except Exception as e:
        raise InvalidModelError(f"fp16 conversion failed: {type(e).__name__}: {first_line(e)}") from e
    # The converter appends the input Casts after their consumers; the checker requires topological order.
    try:
        ir_model = ir.from_proto(converted)
        ir_model.graph.sort()
        converted = ir.to_proto(ir_model)
        check_model(converted)
    except OnnxForgeError:
        raise
    except Exception as e:
        raise InvalidModelError(f"fp16 conversion gave an invalid graph: {type(e).__name__}: {first_line(e)}") from e
    return converted


def _refuse_fp16(model: onnx.ModelProto, path) -> None:
    """Converted twice, onnxruntime's converter declares its 'graph_input_cast_0' twice (found by fuzzing recipes)."""
    halves = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    if halves:
        raise InvalidModelError(f"{path}: already fp16 ({len(halves)} float16 weights, e.g. {halves[0]!r})",
                                hint="convert the float32 model it came from")


def convert_fp16(input_path: str | os.PathLike, output: str | os.PathLike,
                 config: Fp16Config = Fp16Config()) -> Fp16Result:
    """Convert ``input_path`` to fp16 at ``output``; parity vs fp32 beyond tolerance keeps the file and exits 4."""
    out = check_output_path(output, input_path, *paths_in(config))
    loaded = load_stage_input(input_path, "fp16", large=True)
    model = loaded.model
    _refuse_fp16(model, input_path)
    converted = to_fp16_model(model, config)
    feeds, described = parity_feeds(model, config.sample_data, config.input_shapes)
    with contextlib.nullcontext() if loaded.notes else stored_at(model, input_path):
        parity = compare_models(model, converted, feeds, config.tolerance)
    save_model(converted, out)
    result = Fp16Result(path=out, parity=parity, bytes_before=serialized_size(model),
                         bytes_after=serialized_size(converted), parity_inputs=described, notes=loaded.notes)
    if not parity.ok:
        real = config.sample_data is not None
        raise QualityGateError(
            f"fp16 model drifts from fp32 on {described}: {parity.summary()}; kept at {out}",
            hint="block the drifting op types with --block-op (they stay fp32)"
            + ("" if real else "; random inputs can overflow fp16 where real ones do not: check with --data"),
            best_path=str(out),
        )
    return result
