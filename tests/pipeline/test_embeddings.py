"""Embedding tables in int8 with per-row scales: a quarter of the bytes, rows within half a step."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import run_model
from onnx_graphs import model_from_text

from onnxforge.pipeline.quantize.embeddings import MIN_ELEMENTS, embedding_tables, quantize_embeddings


def _lookup(rows: int, width: int = 48, seed: int = 0, tied: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((rows, width)) * rng.uniform(0.01, 5.0, (rows, 1))).astype(np.float32)
    body = "e = Gather <axis = 0> (table, ids)\ny = Mul (e, two)"
    if tied:  # the same table read as an output projection too: must stay float
        body += "\ntt = Transpose (table)\nz = MatMul (y, tt)"
    outputs = f"float[B,S,{width}] y" + (f", float[B,S,{rows}] z" if tied else "")
    model = model_from_text(body, {"table": table, "two": np.float32(2.0)}, "int64[B,S] ids", outputs)
    return model, table


def test_round_trip_within_half_a_step_per_row_and_a_quarter_of_the_bytes():
    rows = MIN_ELEMENTS // 48 + 8
    model, table = _lookup(rows)
    result = quantize_embeddings(model)

    assert result.tables == ("table",)
    assert [n.op_type for n in result.model.graph.node] == ["GatherBlockQuantized", "Mul"]
    assert result.model.ByteSize() < 0.3 * model.ByteSize()
    ids = np.array([[0, 5, rows - 1], [7, 7, 3]], np.int64)
    got = run_model(result.model, {"ids": ids})[0] / 2.0
    step = np.abs(table).max(axis=1) / 127.0
    assert np.all(np.abs(got - table[ids]) <= step[ids][..., None] / 2 + 1e-6)


def test_small_and_shared_tables_stay_float():
    small, _ = _lookup(16)
    assert embedding_tables(small) == [] and quantize_embeddings(small).model is small
    tied, _ = _lookup(MIN_ELEMENTS // 48 + 8, tied=True)
    assert embedding_tables(tied) == []
