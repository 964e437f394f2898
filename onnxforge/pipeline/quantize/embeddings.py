"""Embedding tables stored in int8 with one scale per row.

Rule. A ``Gather`` along axis 0 on a constant float table of [rows, width] with at least
``MIN_ELEMENTS`` elements (MiniLM's 30522x384 word embeddings: 47 of its 87 MB) becomes
onnxruntime's ``GatherBlockQuantized`` (com.microsoft; 8 bits, one block per row): it gathers int8
rows and dequantizes only those. Per row r: scale_r = max_j |T[r, j]| / 127, q = round(T / scale_r)
stored as uint8 with zero point 128, so |T - dequantized| <= scale_r / 2 everywhere. The kernel
wants a power-of-two block of at least 16, so the block is the smallest power of two >= width
(one scale per row either way). onnxruntime's own quantizers handle Gather only in 4 bits
(``MatMulNBitsQuantizer``) or per tensor (QDQ), hence this pass. A table read by anything other
than such a Gather is left in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["MIN_ELEMENTS", "EmbeddingResult", "embedding_tables", "quantize_embeddings"]

MIN_ELEMENTS = 1 << 16  # 256 KB of fp32: smaller tables are not worth a contrib op
_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class EmbeddingResult:
    model: onnx.ModelProto
    tables: tuple[str, ...]  # initializers now stored in int8
    bytes_saved: int


def _tables(graph: ir.Graph) -> list[tuple[str, ir.TensorProtocol, list[ir.Node]]]:
    """(name, values, Gather nodes) of each embedding table."""
    found = []
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            continue
        if tensor.size < MIN_ELEMENTS or value.is_graph_input() or value.is_graph_output():
            continue
        users = value.uses()
        if users and all(u.op_type == "Gather" and u.domain in ("", "ai.onnx") and i == 0
                         and u.attributes.get_int("axis", 0) == 0 for u, i in users):
            found.append((name, tensor, [u for u, _ in users]))
    return found


def embedding_tables(model: onnx.ModelProto) -> list[str]:
    """Names of the tables ``quantize_embeddings`` would store in int8."""
    return [name for name, _, _ in _tables(ir.from_proto(model).graph)]


def quantize_rows(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 codes with zero point 128, float scales [rows, 1]) for a [rows, width] table."""
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(table / scale), -127, 127) + 128
    return codes.astype(np.uint8), scale.astype(np.float32)


def quantize_embeddings(model: onnx.ModelProto) -> EmbeddingResult:
    """``model`` with every embedding table (see the module doc) stored in int8; the input is not changed."""
    copy = ir.from_proto(model)
    graph = copy.graph
    names, saved = [], 0
    for table, tensor, gathers in _tables(graph):
        array = tensor.numpy()
        rows, width = array.shape
        block = max(16, 1 << (int(width) - 1).bit_length())
        codes, scale = quantize_rows(array, block)
        data = _initializer(graph, f"{table}_int8", codes)
        scales = _initializer(graph, f"{table}_scale", scale)
        zero = _initializer(graph, f"{table}_zero_point", np.full((rows, 1), 128, np.uint8))
        for gather in gathers:
            quantized = ir.node("GatherBlockQuantized", [data, gather.inputs[1], scales, zero],
                                {"bits": 8, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
                                domain=_DOMAIN, name=f"{gather.name}_int8" if gather.name else None,
                                outputs=[ir.Value(name=f"{gather.outputs[0].name}_int8")])
            quantized.outputs[0].type = gather.outputs[0].type
            quantized.outputs[0].shape = gather.outputs[0].shape
            graph.insert_before(gather, quantized)
            name = gather.outputs[0].name
            gather.outputs[0].replace_all_uses_with(quantized.outputs[0], replace_graph_outputs=True)
            graph.remove(gather, safe=True)
            quantized.outputs[0].name = name  # the tensor keeps its name (compare matches by name)
        graph.initializers.pop(table)
        names.append(table)
        saved += array.nbytes - codes.nbytes - scale.nbytes
    if names and _DOMAIN not in copy.opset_imports:
        copy.opset_imports[_DOMAIN] = 1
    return EmbeddingResult(ir.to_proto(copy) if names else model, tuple(names), saved)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value
