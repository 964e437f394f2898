"""One candidate scheme turned into a model by the onnxruntime call that implements it.

Static int8 (``quantize_static``) reads the activation ranges computed once by calibration
(``calibration_cache_path``) and never calibrates again; dynamic int8 (``quantize_dynamic``) needs
no ranges; int4 is onnxruntime's ``MatMulNBitsQuantizer`` (weight-only, RTN, symmetric blocks of
``int4_block_size`` along K, ``int4_accuracy_level`` for the kernel's compute type); fp16 is a cast
(onnxforge.pipeline.fp16). Nodes kept in float (the user's, mixed precision's, and for static
schemes the attention-mask nodes) are passed to onnxruntime as ``nodes_to_exclude``.

A static scheme scoped to weight MatMuls quantizes only MatMuls with a constant weight and never
their outputs (``OpTypesToExcludeOutputQuantization``); onnxruntime's QDQ quantizer still rewires
*every* reader of a quantized input to its dequantized copy, so the residual stream next to a
MatMul would be rounded too, and so would a MatMul kept in float beside quantized ones: those
readers are given the float tensor back (only quantized MatMuls read DequantizeLinear outputs), and
onnxruntime runs each quantized MatMul as MatMulIntegerToFloat. A scheme with
``int8_embeddings`` then gets its embedding tables in int8 (embeddings).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxruntime import quantization as ortq

from onnxforge.errors import first_line
from onnxforge.pipeline.quantize.config import QuantizeConfig, Ranges
from onnxforge.pipeline.quantize.embeddings import embedding_tables, quantize_embeddings
from onnxforge.pipeline.quantize.schemes import DYNAMIC_OP_TYPES
from onnxforge.targets import ActivationType, QuantFormat, QuantMethod, QuantScheme, QuantScope

__all__ = ["error_line", "float_readers_read_float", "op_types_to_quantize", "quantizable_op_types",
           "quantize_candidate"]


def quantize_candidate(
    source: Path,
    dest: Path,
    scheme: QuantScheme,
    config: QuantizeConfig,
    ranges: Ranges | None,
    float_nodes: Sequence[str] = (),
    static_exclude: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
) -> None:
    """Write ``scheme`` applied to ``source`` to ``dest``. ``ranges``: the calibration ranges static
    schemes read; ``static_exclude``: nodes static schemes leave in float (attention masks);
    ``op_types``: a static scheme quantizes only these (a profiled scope's measured classes)."""
    excluded = list(dict.fromkeys([*config.exclude_nodes, *float_nodes]))
    if scheme.method is QuantMethod.FP16:
        from onnxforge.pipeline.fp16 import Fp16Config, to_fp16_model

        blocked = tuple(config.exclude_op_types)
        half = to_fp16_model(onnx.load(str(source)), Fp16Config(op_block_list=blocked) if blocked else Fp16Config())
        onnx.save_model(half, str(dest))
        return
    if scheme.method is QuantMethod.INT4:
        _int4(source, dest, config, excluded)
    elif scheme.method is QuantMethod.DYNAMIC:
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
    else:
        _static(source, dest, scheme, config, ranges, [*excluded, *static_exclude], op_types)
    if scheme.int8_embeddings:
        model = onnx.load(str(dest))
        quantized = quantize_embeddings(model)
        if quantized.tables:
            onnx.save_model(quantized.model, str(dest))


def _static(source: Path, dest: Path, scheme: QuantScheme, config: QuantizeConfig, ranges: Ranges | None,
            excluded: list[str], only: Sequence[str] | None = None) -> None:
    if ranges is None:
        raise ValueError(f"{scheme.label}: static quantization needs calibration ranges")
    model = onnx.load(str(source), load_external_data=False)
    extra: dict[str, bool | list[str]] = {  # onnxruntime's extra_options
        "CalibMovingAverage": False,
        "ActivationSymmetric": config.activation_symmetric,
        "WeightSymmetric": config.weight_symmetric,
    }
    op_types = op_types_to_quantize(source, config.exclude_op_types)
    if only is not None:  # onnxruntime adds Q/DQ only around these: float neighbours stay float end to end
        op_types = [t for t in only if t not in config.exclude_op_types]
        if not op_types:
            raise ValueError(f"{scheme.label}: no op type to quantize")
    if scheme.scope is QuantScope.WEIGHT_MATMUL:
        constants = {i.name for i in model.graph.initializer}
        op_types = ["MatMul"]
        excluded += [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in constants]
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    if scheme.int8_embeddings:  # the tables get per-row int8 after; a per-tensor QDQ Gather would take them first
        tables = set(embedding_tables(onnx.load(str(source))))
        excluded += [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
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
            nodes_to_exclude=list(dict.fromkeys(excluded)) or None,
            op_types_to_quantize=op_types,
            calibrate_method=ranges.method.to_ort(),  # must match the cache's
            calibration_cache_path=str(ranges.path),
            extra_options=extra,
        )
    if scheme.scope is QuantScope.WEIGHT_MATMUL and scheme.format is QuantFormat.QDQ:
        onnx.save_model(float_readers_read_float(onnx.load(str(dest))), str(dest))


def float_readers_read_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """Readers other than quantized MatMuls of a QuantizeLinear -> DequantizeLinear pair on an
    activation read the float tensor instead (see the module doc); pairs left unread are removed."""
    graph_model = ir.from_proto(model)
    graph = graph_model.graph
    for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
        q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None or q.inputs[0].const_value is not None:
            continue
        original = q.inputs[0]
        for user, index in list(dq.outputs[0].uses()):
            if not _quantized_matmul(user):
                user.replace_input_with(index, original)
    common_passes.RemoveUnusedNodesPass()(graph_model)
    return ir.to_proto(graph_model)


def _quantized_matmul(node: ir.Node) -> bool:
    """A MatMul whose weight is dequantized too (one kept in float by nodes_to_exclude reads float)."""
    if node.op_type != "MatMul" or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    weight = node.inputs[1].producer()
    return weight is not None and weight.op_type == "DequantizeLinear"


def _int4(source: Path, dest: Path, config: QuantizeConfig, excluded: list[str]) -> None:
    # RTN, not onnxruntime's calibrated HQQ or GPTQ (benchmarks/int4_algorithms.py, 2026-12-07, a 4-layer
    # BERT from a config, blocks of 32): HQQ cut the relative error of the token states from 0.031 to 0.027
    # but writes float zero points, which MatMulNBits runs 2.1x slower than RTN (0.47x fp32), and took
    # 41 s against 0.3 s; GPTQ was worse (0.044) and took 71 s. Neither is a candidate the speed-driven
    # choice would keep, so neither is offered.
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(source))
    constants = {i.name for i in model.graph.initializer}
    if not any(n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in constants for n in model.graph.node):
        raise ValueError("int4: the model has no MatMul with a constant weight to quantize")
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantizer = MatMulNBitsQuantizer(
                model,
                bits=4,
                block_size=config.int4_block_size,
                is_symmetric=config.weight_symmetric,
                accuracy_level=config.int4_accuracy_level or None,
                nodes_to_exclude=excluded,
                op_types_to_quantize=("MatMul",),
            )
            quantizer.process()
    finally:
        quiet.setLevel(level)
    onnx.save_model(quantizer.model.model, str(dest))


def op_types_to_quantize(model_path: Path, excluded: Sequence[str]) -> list[str] | None:
    """The op types in the model that onnxruntime can quantize, less ``excluded``; None (all) when none is excluded."""
    if not excluded:
        return None
    return quantizable_op_types(model_path, excluded)


def quantizable_op_types(model_path: Path, excluded: Sequence[str] = ()) -> list[str]:
    """The op types in the model that onnxruntime's static quantizer handles, less ``excluded``."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = onnx.load(str(model_path), load_external_data=False)
    present = {n.op_type for n in model.graph.node}
    quantizable = (set(QLinearOpsRegistry) | set(QDQRegistry)) & present
    return sorted(quantizable - set(excluded))


def error_line(e: Exception) -> str:
    """An exception as one line for a note: its type and the first line of its message (never cut mid-word)."""
    return f"{type(e).__name__}: {first_line(e, 300)}"
