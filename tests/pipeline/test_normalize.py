"""Load-time normalization (onnxforge.pipeline.normalize): each rule on a tiny graph, checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import assert_numerically_equal, make_classifier, random_images, run_model, save

import onnxforge.model_io
from onnxforge.errors import UsageError
from onnxforge.model_io import input_specs
from onnxforge.pipeline.normalize import load_stage_input, normalize, quantized_ops


def _with_duplicate_names(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        node.name = "layer"
    return model


def _initializers_as_inputs(model: onnx.ModelProto, ir_version: int) -> onnx.ModelProto:
    model.ir_version = ir_version
    for t in model.graph.initializer:
        model.graph.input.append(oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_duplicate_node_names_become_unique_and_the_model_runs():
    model = _with_duplicate_names(make_classifier())
    with pytest.raises(Exception, match="same node name"):
        run_model(model, {"x": random_images(2)})
    fixed, notes = normalize(model)
    assert [n.name for n in fixed.graph.node] == ["layer", "layer_1", "layer_2", "layer_3"]
    assert notes == ["renamed 3 duplicate node names (onnxruntime refuses duplicates)"]
    assert_numerically_equal(make_classifier(), fixed, {"x": random_images(2)})


def test_renaming_skips_names_in_use_and_leaves_omitted_outputs_omitted():
    """onnx-ir's NameFixPass names the omitted "" output of an LSTM (which is then computed): not used for that."""
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W", (1, 8, 3)), ("R", (1, 8, 2)))]
    nodes = [oh.make_node("LSTM", ["x", "W", "R"], ["", "h"], name="n", hidden_size=2),
             oh.make_node("Relu", ["h"], ["c"], name="n"),
             oh.make_node("Relu", ["c"], ["y"], name="n_1")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, 1, 3])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 2])], weights)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)])
    onnx.checker.check_model(model, full_check=True)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.node[1].name = "other"
    fixed, _ = normalize(model)
    assert [n.name for n in fixed.graph.node] == ["n", "n_2", "n_1"]
    assert list(fixed.graph.node[0].output) == ["", "h"]
    assert_numerically_equal(reference, fixed, {"x": rng.standard_normal((5, 1, 3)).astype(np.float32)})


@pytest.mark.parametrize("ir_version", [3, 8])
def test_initializers_listed_as_inputs_become_weights(ir_version):
    model = _initializers_as_inputs(make_classifier(opset=7 if ir_version == 3 else 17), ir_version)
    fixed, notes = normalize(model)
    assert [vi.name for vi in fixed.graph.input] == ["x"]
    assert fixed.ir_version == max(ir_version, 4)
    assert notes[0].startswith("moved 4 initializers out of the graph inputs")
    assert ("IR version 3 -> 4" in notes[0]) is (ir_version == 3)
    assert [s.name for s in input_specs(fixed)] == ["x"]
    assert_numerically_equal(make_classifier(), fixed, {"x": random_images(2)})


def test_an_opset_onnxruntime_does_not_run_is_upgraded():
    model = make_classifier(opset=6, batch=2)
    with pytest.raises(Exception, match="Could not find an implementation"):
        run_model(model, {"x": random_images(2)})
    fixed, notes = normalize(model)
    assert fixed.opset_import[0].version == 7
    assert notes == ["upgraded opset 6 -> 7 (onnxruntime runs opset 7 and later)"]
    assert_numerically_equal(make_classifier(batch=2), fixed, {"x": random_images(2)})


def test_an_opset_that_cannot_be_upgraded_is_one_clear_error():
    with pytest.raises(UsageError) as caught:
        normalize(make_classifier(opset=6), "old.onnx")  # the converter needs static dims for Gemm 6 -> 7
    message = caught.value.message
    assert message.startswith("old.onnx: opset 6 is older than onnxruntime runs (7+)")
    assert ".cc:" not in message and "\n" not in message


def test_a_normal_model_is_left_alone():
    model = make_classifier()
    fixed, notes = normalize(model)
    assert notes == [] and fixed.SerializeToString() == make_classifier().SerializeToString()


def test_quantized_ops_are_found_inside_subgraphs():
    def branch(op: str) -> onnx.GraphProto:
        node = oh.make_node(op, ["a", "s"] if op == "QuantizeLinear" else ["a"], ["o"])
        return oh.make_graph([node], op, [], [oh.make_tensor_value_info("o", onnx.TensorProto.UNDEFINED, None)])

    model = make_classifier()
    model.graph.node.append(oh.make_node("If", ["cond"], ["z"], then_branch=branch("QuantizeLinear"),
                                         else_branch=branch("Relu")))
    assert quantized_ops(model.graph) == ["QuantizeLinear"]
    assert quantized_ops(make_classifier().graph) == []


def test_a_model_past_2_gb_is_refused_before_loading(tmp_path, monkeypatch):
    path = save(make_classifier(), tmp_path / "m.onnx")
    monkeypatch.setattr(onnxforge.model_io, "_PROTOBUF_LIMIT", 100)  # this file is "past 2 GB"
    monkeypatch.setattr(onnxforge.pipeline.normalize, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(UsageError, match="past protobuf's 2 GB, and prune-channels does not take"):
        load_stage_input(path, "prune-channels")


def test_stage_input_notes_what_changed(tmp_path):
    path = save(_with_duplicate_names(_initializers_as_inputs(make_classifier(), 8)), tmp_path / "m.onnx")
    loaded = load_stage_input(path, "prune")
    assert [n.split(" (")[0] for n in loaded.notes] == ["moved 4 initializers out of the graph inputs",
                                                        "renamed 3 duplicate node names"]
    assert_numerically_equal(make_classifier(), loaded.model, {"x": random_images(2)})
