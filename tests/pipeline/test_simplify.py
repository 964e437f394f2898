"""Simplification keeps parity, keeps the smallest graph, and never makes a model worse."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import assert_numerically_equal, make_classifier, make_foldable_model

from onnxforge.pipeline import simplify as simplify_module
from onnxforge.pipeline.simplify import SimplifyConfig, SimplifyMethod, simplify, simplify_model


def _x(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 16)).astype(np.float32)}


@pytest.mark.parametrize("method", list(SimplifyMethod))
def test_folds_constants_and_keeps_the_numbers(method):
    model = make_foldable_model()
    result = simplify_model(model, SimplifyConfig(method=method))
    assert result.nodes_before == 7
    assert result.nodes_after < 7
    assert len(result.model.graph.node) == result.nodes_after
    assert result.chosen != "none (input kept)"
    onnx.checker.check_model(result.model)
    # the folded graph computes the same function at any batch size
    assert_numerically_equal(model, result.model, [_x(1), _x(5, seed=1)])


def test_auto_keeps_the_candidate_with_fewest_nodes():
    result = simplify_model(make_foldable_model())
    usable = [c for c in result.candidates if c.usable]
    assert {c.method for c in result.candidates} == {"onnxsim", "onnxslim", "ort"}
    assert result.nodes_after == min(c.nodes for c in usable)
    assert result.chosen in {c.method for c in usable if c.nodes == result.nodes_after}


def test_minimal_graph_is_kept_as_it_is(classifier):
    result = simplify_model(classifier)
    assert result.chosen == "none (input kept)"
    assert result.nodes_after == result.nodes_before == 4
    assert result.model.SerializeToString() == classifier.SerializeToString()


def _broken_simplifier(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fewer nodes, but wrong: drops the bias add."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = [n for n in out.graph.node if not (n.op_type == "Add" and "h2" in n.input)]
    mm = next(n for n in nodes if n.op_type == "MatMul")
    mm.output[0] = "h"
    ident = next(n for n in nodes if n.op_type == "Identity" and "h" in n.input)
    ident.output[0] = "y"
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_a_simplifier_that_breaks_parity_is_not_chosen(monkeypatch):
    monkeypatch.setitem(simplify_module._RUNNERS, SimplifyMethod.ORT, _broken_simplifier)
    model = make_foldable_model()
    result = simplify_model(model)
    ort_candidate = next(c for c in result.candidates if c.method == "ort")
    assert ort_candidate.parity is not None and not ort_candidate.parity.ok
    assert not ort_candidate.usable
    assert result.chosen != "ort"
    assert_numerically_equal(model, result.model, _x(3))


def test_a_simplifier_that_crashes_is_reported_not_fatal(monkeypatch):
    def crash(model):
        raise RuntimeError("simplifier exploded\nwith details")

    monkeypatch.setitem(simplify_module._RUNNERS, SimplifyMethod.ONNXSLIM, crash)
    result = simplify_model(make_foldable_model())
    slim = next(c for c in result.candidates if c.method == "onnxslim")
    assert slim.error == "RuntimeError: simplifier exploded"
    assert result.chosen in {"onnxsim", "ort"}


def test_never_returns_a_bigger_graph(monkeypatch):
    def grow(model):
        out = onnx.ModelProto.FromString(model.SerializeToString())
        last = out.graph.node[-1]
        last.output[0] = "pre_y"  # the classifier's output is logits
        out.graph.node.append(onnx.helper.make_node("Identity", ["pre_y"], ["logits"]))
        return out

    for method in list(simplify_module._RUNNERS):
        monkeypatch.setitem(simplify_module._RUNNERS, method, grow)
    model = make_classifier()
    result = simplify_model(model)
    assert all(c.usable and c.nodes == 5 for c in result.candidates)
    assert result.chosen == "none (input kept)"
    assert len(result.model.graph.node) == 4


def _sequence_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        textwrap.dedent(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            seq (float[N, L] x) => (float[N, L] y) {
                a = Identity (x)
                y = Relu (a)
            }
            """
        )
    )
    return model


def test_dynamic_non_batch_dims_are_guessed_and_said_or_given():
    # PaddleOCR's [?, 3, ?, ?] made every simplify exit 2 without --input-shape
    guessed = simplify_model(_sequence_model())
    assert "x 1x128" in guessed.parity_inputs and "guessed" in guessed.parity_inputs
    result = simplify_model(_sequence_model(), SimplifyConfig(input_shapes={"x": (1, 7)}))
    assert "x 1x7" in result.parity_inputs and "guessed" not in result.parity_inputs
    assert result.nodes_after == 1
    feeds = {"x": np.linspace(-1, 1, 14, dtype=np.float32).reshape(2, 7)}
    assert_numerically_equal(_sequence_model(), result.model, feeds)


def test_simplify_file_to_file(tmp_path, foldable_path):
    output = tmp_path / "out" / "simple.onnx"
    result = simplify(foldable_path, output)
    assert result.path == output
    assert_numerically_equal(foldable_path, output, _x(2))
    assert len(onnx.load(str(output)).graph.node) == result.nodes_after
    assert result.to_json()["nodes_after"] == result.nodes_after


def test_the_winner_weighs_file_size_with_node_count(monkeypatch):
    # a decoder LM: the fewest nodes was a 110.7 MB file for 61.6 MB; fewer nodes must not buy a bigger file
    model = make_foldable_model()

    def fewer_nodes_but_bigger(m):
        grown = onnx.ModelProto()
        grown.CopyFrom(m)
        del grown.graph.node[1:3]  # drop the Identity chain: fewer nodes, same numbers
        grown.graph.node[1].input[1] = "w"
        pad = onnx.numpy_helper.from_array(np.arange(50_000, dtype=np.float32), "unused_padding")
        grown.graph.initializer.append(pad)  # ...and a file twice the size
        return grown

    for method in list(simplify_module._RUNNERS):
        monkeypatch.setitem(simplify_module._RUNNERS, method, fewer_nodes_but_bigger)
    result = simplify_model(model)
    assert all(c.usable and c.nodes < result.nodes_before for c in result.candidates)
    assert result.chosen == "none (input kept)" and result.bytes_after == result.bytes_before


def test_parity_says_what_it_ran_on(tmp_path, foldable_path):
    result = simplify(foldable_path, tmp_path / "s.onnx")
    assert result.parity_inputs.startswith("random N(0,1) inputs (x 1x16)")
    np.savez(tmp_path / "data.npz", x=np.full((3, 16), 1000.0, np.float32))
    result = simplify(foldable_path, tmp_path / "s2.onnx", SimplifyConfig(sample_data=tmp_path / "data.npz"))
    assert result.parity_inputs == f"2 sample(s) of {tmp_path / 'data.npz'}"
    assert result.to_json()["parity_inputs"] == result.parity_inputs
