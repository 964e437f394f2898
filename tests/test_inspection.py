"""inspect_model: what a model takes and returns, its ops and parameters, looking into subgraphs."""

from __future__ import annotations

import textwrap

import onnx.parser

from onnxforge.inspection import inspect_model


def test_counts_ops_inside_subgraphs(tmp_path):
    model = onnx.parser.parse_model(
        textwrap.dedent(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            branchy (bool cond, float[4] x) => (float[4] y) {
                y = If (cond) <
                    then_branch = then_g () => (float[4] a) { a = Relu (x) },
                    else_branch = else_g () => (float[4] b) { n = Neg (x)  b = Relu (n) }
                >
            }
            """
        )
    )
    path = tmp_path / "branchy.onnx"
    path.write_bytes(model.SerializeToString())
    info = inspect_model(path)
    assert info.ops == {"Relu": 2, "If": 1, "Neg": 1}
    assert info.nodes == 4
    assert [s.name for s in info.inputs] == ["cond", "x"]
    assert info.parameters == 0


def test_parameters_and_size(classifier_path):
    info = inspect_model(classifier_path)
    assert info.parameters == 4 * 27 + 4 + 5 * 256 + 5
    assert info.bytes == classifier_path.stat().st_size
    assert info.opsets == {"ai.onnx": 17}
    assert info.producer == "unknown"
