"""onnxforge compare: per-tensor error in graph order and the first tensor where B diverges from A."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from conftest import write_npz
from transformer_graphs import HIDDEN, make_encoder

from onnxforge.cli import main
from onnxforge.pipeline.compare import compare_models


def _data(tmp_path, count: int = 4):
    rng = np.random.default_rng(0)
    mask = np.ones((count, 6), np.int64)
    mask[::2, 4:] = 0
    return write_npz(tmp_path / "data.npz", x=rng.standard_normal((count, 6, HIDDEN)).astype(np.float32), mask=mask)


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save_model(model, str(path))
    return str(path)


def _perturbed(model: onnx.ModelProto, weight: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == weight:
            w = onnx.numpy_helper.to_array(init)
            noise = np.random.default_rng(1).standard_normal(w.shape).astype(np.float32) * w.std()
            init.CopyFrom(onnx.numpy_helper.from_array(w + noise, weight))
    return out


def test_identical_models_match_everywhere(tmp_path):
    a = _save(make_encoder(layers=2), tmp_path / "a.onnx")
    result = compare_models(a, a, _data(tmp_path))
    assert result.samples == 4 and result.first_divergence is None
    assert len(result.tensors) > 50 and all(not math.isfinite(t.sqnr_db) for t in result.tensors)
    assert [t.name for t in result.outputs] == ["y"] and result.outputs[0].cosine == 1.0


def test_an_injected_divergence_is_found_at_the_node_that_diverges(tmp_path):
    model = make_encoder(layers=2)
    a = _save(model, tmp_path / "a.onnx")
    b = _save(_perturbed(model, "w11"), tmp_path / "b.onnx")  # layer 1's first feed-forward weight
    result = compare_models(a, b, _data(tmp_path))

    assert result.first_divergence.name == "f1m" and result.first_divergence.op_type == "MatMul"
    names = [t.name for t in result.tensors]
    before = result.tensors[: names.index("f1m")]
    assert before and all(not math.isfinite(t.sqnr_db) for t in before)  # nothing upstream changed
    assert result.outputs[0].sqnr_db < 20.0


def test_without_matching_tensor_names_the_outputs_are_still_compared(tmp_path):
    model = make_encoder()
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    keep = {"x", "mask", "y"} | {i.name for i in renamed.graph.initializer}
    for node in renamed.graph.node:
        node.input[:] = [i if i in keep else f"other_{i}" for i in node.input]
        node.output[:] = [o if o in keep else f"other_{o}" for o in node.output]
    result = compare_models(_save(model, tmp_path / "a.onnx"), _save(renamed, tmp_path / "b.onnx"), _data(tmp_path))

    assert result.tensors == [] and len(result.outputs) == 1 and not math.isfinite(result.outputs[0].sqnr_db)
    assert any("graph outputs only" in n for n in result.notes)


def test_renamed_tensors_match_by_their_producing_node(tmp_path):
    model = make_encoder()
    for i, node in enumerate(model.graph.node):
        node.name = f"node{i}"
    renamed = _perturbed(model, "w10")
    keep = {"x", "mask", "y"} | {i.name for i in renamed.graph.initializer}
    for node in renamed.graph.node:
        node.input[:] = [i if i in keep else f"q_{i}" for i in node.input]
        node.output[:] = [o if o in keep else f"q_{o}" for o in node.output]
    result = compare_models(_save(model, tmp_path / "a.onnx"), _save(renamed, tmp_path / "b.onnx"), _data(tmp_path))

    assert result.tensors and {t.matched_by for t in result.tensors} == {"producer"}
    assert result.first_divergence.name == "f0m" and result.first_divergence.name_b == "q_f0m"


def test_cli_writes_the_table_json_and_html(tmp_path, capsys):
    model = make_encoder(layers=2)
    a = _save(model, tmp_path / "a.onnx")
    b = _save(_perturbed(model, "w11"), tmp_path / "b.onnx")
    report, html = tmp_path / "r.json", tmp_path / "r.html"
    code = main(["compare", a, b, "--data", str(_data(tmp_path)), "--json", str(report), "--html", str(html)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "first below 20 dB at f1m" in printed
    payload = json.loads(report.read_text())
    assert payload["first_divergence"]["name"] == "f1m" and payload["outputs"][0]["name"] == "y"
    assert "<svg" in html.read_text()


def test_the_accumulator_sums_large_tensors_a_chunk_at_a_time_to_the_same_numbers():
    """Tensors over a chunk (here 2.5 chunks, the last one short) give the sums of the whole-tensor formula."""
    from onnxforge.pipeline.compare import _CHUNK, ErrorAccumulator

    rng = np.random.default_rng(3)
    ref = rng.standard_normal((5, _CHUNK // 2)).astype(np.float32)
    val = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.1
    val[-1, -1] = 40.0  # the largest difference is in the short last chunk
    acc = ErrorAccumulator()
    acc.add(ref, val)
    r, v = ref.astype(np.float64), val.astype(np.float64)
    assert acc.signal == pytest.approx(np.square(r).sum(), rel=1e-12)
    assert acc.noise == pytest.approx(np.square(r - v).sum(), rel=1e-12)
    assert acc.dot == pytest.approx((r * v).sum(), rel=1e-12)
    assert acc.value_energy == pytest.approx(np.square(v).sum(), rel=1e-12)
    assert acc.max_abs == pytest.approx(float(np.abs(r - v).max()))


def test_the_html_chart_labels_the_real_db_negative_and_identical_included():
    """A -15.6 dB output was labelled "0 dB" (the bar length was clamped and its label with it)."""
    import math
    import re
    from pathlib import Path

    from onnxforge.pipeline.compare import CompareResult, TensorError, compare_report_html

    def tensor(name: str, db: float) -> TensorError:
        return TensorError(name, name, f"n_{name}", "MatMul", "name", db, 0.5, 1.0, 0.1)

    out = tensor("y", -15.6)
    result = CompareResult(Path("a.onnx"), Path("b.onnx"), 1, 20.0,
                           [tensor("h1", 42.0), tensor("h2", math.inf)], [out], out)
    page = compare_report_html(result)
    labels = re.findall(r'<text class="value"[^>]*>([^<]*)</text>', page)
    assert labels == ["42.0 dB", "identical", "-15.6 dB"]
    widths = [float(w) for w in re.findall(r'class="bar"[^>]*width="([0-9.]+)"', page)]
    assert widths[2] == 0 and widths[0] > 0  # no bar below zero; the label still says how far below
