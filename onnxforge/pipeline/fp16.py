"""FP16 conversion for GPU targets (CUDA, TensorRT), where half precision runs on tensor cores.

Rule: every float32 initializer and activation becomes float16, except where fp16 would lose the
value: onnxruntime's converter clamps weights into fp16's range, and ops that are numerically
fragile in fp16 or have no fp16 kernel (its default block list: Resize, Range, NonMaxSuppression,
TopK, ...) stay float32 behind Cast nodes. Inputs and outputs keep float32 (``keep_io_types``),
so callers feed the same arrays. The result must match the fp32 model within a loose tolerance
(fp16 has ~3 decimal digits), checked here on the CPU; on a CPU the fp16 model is slower — it is
a file for the GPU, not for this machine.
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
from onnxforge.errors import InvalidModelError, QualityGateError, first_line
from onnxforge.model_io import input_specs, load_model, save_model
from onnxforge.parity import ParityReport, Tolerance, compare_models
from onnxforge.targets.feeds import generate_feeds

__all__ = ["Fp16Config", "Fp16Result", "convert_fp16", "to_fp16_model"]


@dataclass(frozen=True, kw_only=True)
class Fp16Config:
    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    tolerance: Tolerance = Tolerance(atol=1e-2, rtol=1e-2)



@dataclass
class Fp16Result:
    path: Path
    parity: ParityReport
    bytes_before: int
    bytes_after: int

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "parity": self.parity.to_json(),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def to_fp16_model(model: onnx.ModelProto, config: Fp16Config = Fp16Config()) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = list(DEFAULT_OP_BLOCK_LIST) + list(config.op_block_list)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            converted = convert_float_to_float16(
                onnx.ModelProto.FromString(model.SerializeToString()),
                keep_io_types=config.keep_io_types,
                op_block_list=blocked,
            )
    except Exception as e:
        raise InvalidModelError(f"fp16 conversion failed: {type(e).__name__}: {first_line(e)}") from e
    # The converter appends the input Casts after their consumers; the checker requires topological order.
    try:
        ir_model = ir.from_proto(converted)
        ir_model.graph.sort()
        converted = ir.to_proto(ir_model)
        onnx.checker.check_model(converted, full_check=False)
    except Exception as e:
        raise InvalidModelError(f"fp16 conversion gave an invalid graph: {type(e).__name__}: {first_line(e)}") from e
    return converted


def _refuse_fp16(model: onnx.ModelProto, path) -> None:
    """Converted twice, onnxruntime's converter declares its 'graph_input_cast_0' twice (found by fuzzing recipes)."""
    halves = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    if halves:
        raise InvalidModelError(f"{path}: already fp16 ({len(halves)} float16 weights, e.g. {halves[0]!r})",
                                hint="convert the float32 model it came from")


def convert_fp16(input_path: str | os.PathLike, output: str | os.PathLike, config: Fp16Config = Fp16Config()) -> Fp16Result:
    """Convert ``input_path`` to fp16 at ``output``; parity vs fp32 beyond tolerance keeps the file and exits 4."""
    out = check_output_path(output, input_path, *paths_in(config))
    model = load_model(input_path)
    _refuse_fp16(model, input_path)
    converted = to_fp16_model(model, config)
    before, after = model.SerializeToString(), converted.SerializeToString()
    feeds = [generate_feeds(input_specs(model), batch=1, overrides=config.input_shapes, seed=s) for s in (1, 2)]
    parity = compare_models(before, after, feeds, config.tolerance)
    save_model(converted, out)
    result = Fp16Result(out, parity, len(before), len(after))
    if not parity.ok:
        raise QualityGateError(
            f"fp16 model drifts from fp32: {parity.summary()}; kept at {out}",
            hint="block the drifting op types with op_block_list (they stay fp32)",
            best_path=str(out),
        )
    return result
