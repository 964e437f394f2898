"""One candidate scheme turned into a model by the onnxruntime call that implements it.

Static int8 (``quantize_static``) reads the activation ranges computed once by calibration
(``calibration_cache_path``) and never calibrates again; dynamic int8 (``quantize_dynamic``) needs
no ranges; fp16 is a cast (onnxforge.pipeline.fp16). Nodes kept in float (the user's and mixed
precision's) are passed to onnxruntime as ``nodes_to_exclude``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import onnx
from onnxruntime import quantization as ortq

from onnxforge.pipeline.quantize.config import QuantizeConfig
from onnxforge.pipeline.quantize.schemes import DYNAMIC_OP_TYPES
from onnxforge.targets import ActivationType, QuantFormat, QuantMethod, QuantScheme

__all__ = ["error_line", "op_types_to_quantize", "quantize_candidate"]


def quantize_candidate(
    source: Path,
    dest: Path,
    scheme: QuantScheme,
    config: QuantizeConfig,
    cache: Path,
    float_nodes: Sequence[str] = (),
) -> None:
    """quantize_static with the cached calibration ranges (never calibrates again); dynamic int8
    (quantize_dynamic, no ranges needed) or an fp16 cast for the schemes that ask for those."""
    excluded = list(dict.fromkeys([*config.exclude_nodes, *float_nodes]))
    if scheme.method is QuantMethod.FP16:
        from onnxforge.pipeline.fp16 import Fp16Config, to_fp16_model

        blocked = tuple(config.exclude_op_types)
        half = to_fp16_model(onnx.load(str(source)), Fp16Config(op_block_list=blocked) if blocked else Fp16Config())
        onnx.save_model(half, str(dest))
        return
    if scheme.method is QuantMethod.DYNAMIC:
        op_types = [t for t in DYNAMIC_OP_TYPES if t not in config.exclude_op_types]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ortq.quantize_dynamic(
                str(source),
                str(dest),
                per_channel=scheme.per_channel,
                reduce_range=scheme.reduce_range,
                weight_type=ortq.QuantType.QInt8,
                op_types_to_quantize=op_types,
                nodes_to_exclude=excluded or None,
                extra_options={"WeightSymmetric": config.weight_symmetric},
            )
        return
    act = ortq.QuantType.QUInt8 if scheme.activations is ActivationType.UINT8 else ortq.QuantType.QInt8
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ortq.quantize_static(
            str(source),
            str(dest),
            calibration_data_reader=None,
            quant_format=ortq.QuantFormat.QDQ if scheme.format is QuantFormat.QDQ else ortq.QuantFormat.QOperator,
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range,
            activation_type=act,
            weight_type=ortq.QuantType.QInt8,
            nodes_to_exclude=excluded or None,
            op_types_to_quantize=op_types_to_quantize(source, config.exclude_op_types),
            calibrate_method=config.calibration_method.to_ort(),
            calibration_cache_path=str(cache),
            extra_options={
                "CalibMovingAverage": False,
                "ActivationSymmetric": config.activation_symmetric,
                "WeightSymmetric": config.weight_symmetric,
            },
        )


def op_types_to_quantize(model_path: Path, excluded: Sequence[str]) -> list[str] | None:
    """The op types in the model that onnxruntime can quantize, less ``excluded``; None (all) when none is excluded."""
    if not excluded:
        return None
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = onnx.load(str(model_path), load_external_data=False)
    present = {n.op_type for n in model.graph.node}
    quantizable = (set(QLinearOpsRegistry) | set(QDQRegistry)) & present
    return sorted(quantizable - set(excluded))


def error_line(e: Exception) -> str:
    """An exception as one line for a note: its type and the first line of its message."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"
