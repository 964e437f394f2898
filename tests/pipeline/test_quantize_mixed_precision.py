"""Accuracy-aware mixed precision: a model whose int8 version breaks on one layer gets that layer
(and what must go with it) back to float, and nothing much else."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import QualityGateError, UsageError
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize, scheme_id
from onnxforge.pipeline.quantize.mixed_precision import node_groups, rank_nodes, search_float_nodes, share_in_float
from onnxforge.pipeline.quantize.quant_error import NodeError
from onnxforge.targets import ActivationType, QuantFormat, QuantScheme

# The tiny test models are overhead-bound (int8 measures ~0.73x fp32), so quantize would keep the input
# and exit 4 (issue 23); these tests are about other things, so int8 is timed 2x faster (conftest.int8_faster).
pytestmark = pytest.mark.usefixtures("int8_faster")

D, CLASSES = 16, 5
U8_PER_CHANNEL = parse_scheme("qdq-u8s8-per-channel")


def outlier_model(outlier: float = 2000.0, seed: int = 0) -> onnx.ModelProto:
    """fc1 -> relu -> fc2 -> +bias2 -> fc3 -> fc4. bias2 puts ``outlier`` on channel 3, which fc3
    multiplies by zero: harmless in fp32, but quantizing that tensor to 8 bits over a range of
    ``outlier`` rounds every other channel to a few levels, so fc3's output is wrong."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (D, D)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (D, D)).astype(np.float32)
    b2 = np.zeros(D, np.float32)
    b2[3] = outlier
    w3 = rng.normal(0, 0.5, (D, CLASSES)).astype(np.float32)
    w3[3] = 0.0
    w4 = rng.normal(0, 0.5, (CLASSES, CLASSES)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (w4, "w4")]]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["h2"], name="bias2"),
        helper.make_node("MatMul", ["h2", "w3"], ["h3"], name="fc3"),
        helper.make_node("MatMul", ["h3", "w4"], ["y"], name="fc4"),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def samples(n: int, seed: int) -> SampleSet:
    return SampleSet({"x": np.random.default_rng(seed).normal(0, 1, (n, D)).astype(np.float32)}, None, f"seed{seed}")


@pytest.fixture
def outlier_path(tmp_path):
    path = tmp_path / "outlier.onnx"
    onnx.save(outlier_model(), path)
    return path


@pytest.fixture
def eval_path(tmp_path):
    path = tmp_path / "eval.npz"
    np.savez(path, x=samples(200, seed=7).inputs["x"])
    return path


def fast_config(eval_path, **overrides) -> QuantizeConfig:
    base = dict(
        schemes=(U8_PER_CHANNEL,),
        metric=Metric.AGREEMENT,
        tolerance=1.0,
        eval_data=eval_path,
        latency_rounds=3,
    )
    return QuantizeConfig(**(base | overrides))


def test_without_mixed_precision_the_outlier_breaks_the_gate(tmp_path, outlier_path, eval_path):
    with pytest.raises(QualityGateError) as info:
        quantize(outlier_path, tmp_path / "q.onnx", samples(64, 1), fast_config(eval_path, mixed_precision=False))
    assert info.value.exit_code == 4
    assert (tmp_path / "q.onnx").exists()  # the best model found is still saved


def test_mixed_precision_returns_the_outlier_layer_to_float(tmp_path, outlier_path, eval_path):
    result = quantize(outlier_path, tmp_path / "q.onnx", samples(64, 1), fast_config(eval_path))
    plain = next(c for c in result.candidates if c.scheme == U8_PER_CHANNEL.label)
    chosen = result.chosen_candidate
    assert not plain.meets_tolerance
    assert chosen.meets_tolerance and chosen.score > plain.score
    # fc3 reads the outlier tensor; its producer (fc2 + bias2, fused into one Gemm by
    # quant_pre_process) must go too, or its output quantization would remain
    assert "fc3" in chosen.float_nodes
    assert any(name.startswith(("fc2", "bias2")) for name in chosen.float_nodes)
    assert len(chosen.float_nodes) <= 3
    assert result.mixed_precision is not None and result.mixed_precision.ranking[0].node == "fc3"
    saved = onnx.load(tmp_path / "q.onnx")
    float_matmuls = [n.name for n in saved.graph.node if n.name == "fc3"]
    assert float_matmuls, "fc3 stays an fp32 MatMul in the saved model"
    fc3 = next(n for n in saved.graph.node if n.name == "fc3")
    producers = {o: n.op_type for n in saved.graph.node for o in n.output}
    assert producers.get(fc3.input[0]) != "DequantizeLinear"
    # recorded for the manifest: every step with its score, and the float nodes
    payload = json.loads(json.dumps(result.to_json()))
    steps = payload["mixed_precision"]["steps"]
    assert steps and all("score" in s and "float_nodes" in s for s in steps)
    assert payload["mixed_precision"]["float_nodes"] == chosen.float_nodes
    assert any(c["float_nodes"] for c in payload["candidates"])
    assert chosen.latency is not None  # re-timed with the others


def test_when_even_mixed_precision_misses_the_best_model_is_saved_and_exit_4(tmp_path, outlier_path, eval_path):
    config = fast_config(eval_path, metric=Metric.REL_ERROR, tolerance=1e-9, mixed_precision_steps=3)
    with pytest.raises(QualityGateError) as info:
        quantize(outlier_path, tmp_path / "q.onnx", samples(64, 1), config)
    assert info.value.exit_code == 4 and info.value.best_path == str(tmp_path / "q.onnx")
    assert "float node(s)" in info.value.message  # the best found is the mixed-precision one
    saved = onnx.load(tmp_path / "q.onnx")
    assert any(n.name == "fc3" for n in saved.graph.node)


def test_mixed_precision_is_deterministic(tmp_path, outlier_path, eval_path):
    a = quantize(outlier_path, tmp_path / "a.onnx", samples(64, 1), fast_config(eval_path))
    b = quantize(outlier_path, tmp_path / "b.onnx", samples(64, 1), fast_config(eval_path))
    assert a.chosen_candidate.float_nodes == b.chosen_candidate.float_nodes
    assert [e.node for e in a.mixed_precision.ranking] == [e.node for e in b.mixed_precision.ranking]


def test_user_excluded_nodes_are_not_ranked(tmp_path, outlier_path, eval_path):
    config = fast_config(eval_path, exclude_nodes=("fc4",))
    result = quantize(outlier_path, tmp_path / "q.onnx", samples(64, 1), config)
    assert "fc4" not in [e.node for e in result.mixed_precision.ranking]


def _error(node: str, local: float) -> NodeError:
    return NodeError(node=node, op_type="MatMul", output=node, local_sqnr_db=local, sqnr_db=local, relative_error=0.1)


def test_ranking_is_worst_first_with_graph_order_ties():
    errors = [_error("a", 30.0), _error("b", 10.0), _error("c", 30.0), _error("d", float("inf"))]
    assert [e.node for e in rank_nodes(errors)] == ["b", "a", "c", "d"]


def test_search_bisects_to_the_fewest_float_nodes():
    ranking = [_error(f"n{i}", float(i)) for i in range(20)]
    groups = {e.node: (e.node,) for e in ranking}
    needed = {"n0", "n1", "n2", "n3", "n4"}  # the gate holds once the 5 worst are float

    def evaluate(float_nodes):
        ok = needed <= set(float_nodes)
        return (1.0 if ok else 0.5), ok

    search = search_float_nodes("s", ranking, groups, evaluate, max_float_fraction=1.0, max_steps=10)
    assert set(search.best.float_nodes) == needed
    assert [len(s.float_nodes) for s in search.steps] == [1, 2, 3, 4, 6, 5]


def test_search_gives_up_within_its_limits():
    ranking = [_error(f"n{i}", float(i)) for i in range(10)]
    groups = {e.node: (e.node,) for e in ranking}
    search = search_float_nodes("s", ranking, groups, lambda nodes: (0.0, False), max_float_fraction=0.3)
    assert search.best is None
    assert max(len(s.float_nodes) for s in search.steps) <= 3


def test_a_failing_step_is_recorded_not_raised():
    ranking = [_error("a", 1.0), _error("b", 2.0)]

    def evaluate(float_nodes):
        if len(float_nodes) == 1:
            raise RuntimeError("boom")
        return 1.0, True

    search = search_float_nodes("s", ranking, {}, evaluate, max_float_fraction=1.0)
    assert search.steps[0].error.startswith("RuntimeError") and search.best.float_nodes == ("a", "b")


def test_a_share_in_float_takes_the_worst_nodes_with_their_groups():
    ranking = [_error(f"n{i}", float(i)) for i in range(10)]
    groups = {"n0": ("n0", "n5"), "n1": ("n1",), "n2": ("n2", "n3", "n4")}
    assert share_in_float(ranking, groups, 0.0) == ()
    assert share_in_float(ranking, groups, 0.05) == ("n0", "n5")  # the worst group, even past the share
    assert share_in_float(ranking, groups, 0.3) == ("n0", "n5", "n1")
    # n2's group (3 more) would pass 4 of 10: it stops there rather than let n3 or n4 jump ahead
    assert share_in_float(ranking, groups, 0.4) == ("n0", "n5", "n1")
    assert share_in_float(ranking, groups, 0.6) == ("n0", "n5", "n1", "n2", "n3", "n4")


def test_float_share_keeps_the_sensitive_layer_in_float_without_a_search(tmp_path, outlier_path, eval_path):
    plain = quantize(outlier_path, tmp_path / "p.onnx", samples(64, 1),
                     fast_config(eval_path, mixed_precision=False, tolerance=1e30)).chosen_candidate
    config = fast_config(eval_path, mixed_precision=False, tolerance=1e30, float_share=0.2)
    result = quantize(outlier_path, tmp_path / "q.onnx", samples(64, 1), config)
    (shared,) = result.candidates  # the scheme itself, quantized once with its worst nodes in float
    assert "fc3" in shared.float_nodes and shared.scheme == f"{U8_PER_CHANNEL.label} + {len(shared.float_nodes)} " \
        "float node(s)"
    assert shared.score > plain.score and not plain.float_nodes
    assert result.mixed_precision is None  # no gated search ran: the share alone decided
    fc3 = next(n for n in onnx.load(tmp_path / "q.onnx").graph.node if n.name == "fc3")
    assert fc3.op_type == "MatMul"


def test_mixed_precision_after_float_share_keeps_the_share_in_float(tmp_path, outlier_path, eval_path):
    config = fast_config(eval_path, metric=Metric.REL_ERROR, tolerance=1e-9, mixed_precision_steps=2, float_share=0.2)
    with pytest.raises(QualityGateError) as info:
        quantize(outlier_path, tmp_path / "q.onnx", samples(64, 1), config)
    assert info.value.message.count("float node(s)") >= 2  # the best is mixed precision on top of the share
    saved = onnx.load(tmp_path / "q.onnx")
    fc3 = next(n for n in saved.graph.node if n.name == "fc3")
    producers = {o: n.op_type for n in saved.graph.node for o in n.output}
    assert fc3.op_type == "MatMul" and producers.get(fc3.input[0]) != "DequantizeLinear"


def test_float_share_out_of_range_is_a_usage_error(eval_path):
    with pytest.raises(UsageError, match="float_share"):
        fast_config(eval_path, float_share=1.0)


def test_groups_bring_the_producer_of_a_quantized_input(tmp_path, outlier_path):
    from onnxruntime import quantization as ortq

    from onnxforge.pipeline.calibration import CalibrationReader

    qdq_path = tmp_path / "qdq.onnx"
    ortq.quantize_static(
        str(outlier_path), str(qdq_path), CalibrationReader(samples(32, 1), 16), quant_format=ortq.QuantFormat.QDQ
    )
    groups = node_groups(onnx.load(qdq_path), ["fc1", "fc2", "bias2", "fc3", "fc4"])
    assert set(groups["fc3"]) == {"bias2", "fc3"}
    assert "fc3" in groups["fc3"] and groups["fc1"] == ("fc1",)


@pytest.mark.parametrize(
    "text",
    ["qdq-u8s8-per-channel", "qdq-s8s8-per-tensor", "qoperator-u8s8-per-channel-reduce-range"],
)
def test_scheme_ids_round_trip(text):
    assert scheme_id(parse_scheme(text)) == text


def test_scheme_parse_maps_to_the_typed_config():
    scheme = parse_scheme("QOperator-S8S8-per-tensor")
    assert scheme == QuantScheme(format=QuantFormat.QOPERATOR, activations=ActivationType.INT8, per_channel=False)


@pytest.mark.parametrize("text", ["qdq", "qdq-u8u8-per-channel", "int4-u8s8-per-channel", "qdq-u8s8"])
def test_unknown_schemes_are_usage_errors(text):
    with pytest.raises(UsageError, match="unknown quantization scheme"):
        parse_scheme(text)
