"""Padding removed inside a transformer (token_packing): per-token layers on real tokens only, kept only
when the outputs do not show padded positions; and the attention-fusion choice the search may make."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_numerically_equal
from onnx import helper, numpy_helper
from transformer_graphs import HIDDEN, encoder_feeds, make_encoder

from onnxforge.pipeline.passes.quantize import QuantizePass
from onnxforge.pipeline.quantize import token_packing
from onnxforge.pipeline.quantize.token_packing import pack_tokens
from onnxforge.pipeline.quantize.transformer_fusion import fuse_transformer

VOCAB = 64


def pooled_encoder(layers: int = 2) -> onnx.ModelProto:
    """make_encoder with sentence-transformers' pooling on top: the mean of the outputs over real tokens."""
    model = make_encoder(layers=layers, vocab=VOCAB)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "axis2"))
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    graph.node.extend([
        helper.make_node("Cast", ["mask"], ["pool_m"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pool_m", "axis2"], ["pool_m3"]),
        helper.make_node("Mul", ["y", "pool_m3"], ["pool_masked"]),
        helper.make_node("ReduceSum", ["pool_masked", "axis1"], ["pool_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["pool_m3", "axis1"], ["pool_count"], keepdims=0),
        helper.make_node("Div", ["pool_sum", "pool_count"], ["pooled"]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, ["B", HIDDEN]))
    onnx.checker.check_model(model, full_check=True)
    return model


def singles(lengths=(5, 3, 7, 4), seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One sample each (batch 1, unpadded), of the given lengths: what calibration sentences look like."""
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, VOCAB, (1, n)).astype(np.int64), "mask": np.ones((1, n), np.int64)}
            for n in lengths]


def _padded(batch: int = 6, tokens: int = 9, seed: int = 7) -> dict[str, np.ndarray]:
    feeds = encoder_feeds(batch, tokens, seed=seed, vocab=VOCAB)
    feeds["mask"][0, 2:] = 0  # one sentence of two tokens among longer ones
    return feeds


def _weight_matmul_rows(model: onnx.ModelProto, feeds) -> set[tuple[int, ...]]:
    """The leading dims of every constant-weight MatMul's output when ``model`` runs ``feeds``."""
    weights = {i.name for i in model.graph.initializer}
    names = [n.output[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    shapes = token_packing._probe(model, feeds, feeds).first
    return {shapes[n][:-1] for n in names}


def test_pooled_encoder_runs_its_projections_on_real_tokens_with_the_same_embeddings():
    model = pooled_encoder()
    result = pack_tokens(model, singles())

    assert result.packed > 0 and "real tokens of mask 'mask'" in result.note
    feeds = _padded()
    # every projection and FFN MatMul sees [1, real tokens, features], not [batch, sequence, features]
    assert _weight_matmul_rows(result.model, feeds) == {(1, int(feeds["mask"].sum()))}
    assert_numerically_equal(model, result.model, [feeds, _padded(2, 3, seed=1), singles()[0]], atol=1e-5)


def test_holes_in_the_mask_are_packed_too():
    model = pooled_encoder(layers=1)
    packed = pack_tokens(model, singles()).model
    feeds = encoder_feeds(3, 8, seed=4, vocab=VOCAB)
    feeds["mask"][1] = [1, 0, 1, 1, 0, 0, 1, 0]  # not only a padded tail
    assert_numerically_equal(model, packed, feeds, atol=1e-5)


def test_an_output_that_shows_padded_positions_keeps_the_graph():
    model = make_encoder(layers=1, vocab=VOCAB)  # y is [B, S, H]: its padded rows are whatever was computed
    result = pack_tokens(model, singles())

    assert result.model is model and result.packed == 0
    assert "changed the outputs" in result.note


def test_samples_of_one_length_still_check_against_masked_positions():
    model = make_encoder(layers=1, vocab=VOCAB)
    result = pack_tokens(model, singles((6, 6, 6)))  # no padding anywhere in the data: the check masks some

    assert result.model is model and "changed the outputs" in result.note
    assert pack_tokens(pooled_encoder(1), singles((6, 6, 6))).packed > 0


def test_without_a_mask_input_nothing_is_packed():
    model = pooled_encoder(layers=1)
    model.graph.node.insert(0, helper.make_node("Gather", ["table", "mask"], ["unused_lookup"]))  # mask as indices
    result = pack_tokens(model, singles())
    assert result.packed == 0 and "no single 2-D integer mask input" in result.note


@pytest.mark.parametrize("attention", [True, False])
def test_fused_encoders_are_packed_with_the_same_embeddings(attention):
    model = pooled_encoder()
    fusion = fuse_transformer(model, [_padded(), singles()[0]], attention=attention)
    ops = {n.op_type for n in fusion.model.graph.node}
    assert "BiasGelu" in ops and ("Attention" in ops) == attention

    result = pack_tokens(fusion.model, singles())
    assert result.packed > 0
    assert_numerically_equal(model, result.model, [_padded(), _padded(3, 5, seed=2)], atol=1e-4)


def test_the_search_may_choose_attention_fusion_on_transformers_only(classifier):
    knobs = {k.field: k for k in QuantizePass.knobs("cpu", pooled_encoder(1))}
    assert knobs["fuse_attention"].choices == (True, False)
    assert "fuse_attention" not in {k.field for k in QuantizePass.knobs("cpu", classifier)}


def test_attention_fusion_is_a_pinnable_knob_before_the_model_is_read():
    assert "fuse_attention" in {k.field for k in QuantizePass.knobs("cpu")}  # how a pinned value is checked


def _pooled_encoder_and_sentences(tmp_path):
    """The pooled encoder saved, and a folder of variable-length sentences (one .npz each) to calibrate on."""
    model = tmp_path / "pooled.onnx"
    onnx.save_model(pooled_encoder(), str(model))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, sample in enumerate(singles((5, 3, 7, 4, 6, 2, 8, 5), seed=3)):
        np.savez(calib / f"{i:02d}.npz", **sample)
    return model, calib


@pytest.mark.usefixtures("int8_faster")  # the tiny encoder is overhead-bound: only the graph is under test
@pytest.mark.parametrize("fuse_attention", [True, False])
def test_quantize_runs_a_pooled_encoder_on_real_tokens(tmp_path, fuse_attention):
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize

    model, calib = _pooled_encoder_and_sentences(tmp_path)
    out = tmp_path / "int8.onnx"
    result = quantize(model, out, calib, QuantizeConfig(
        metric=Metric.COSINE, tolerance=0.9, latency_rounds=2, mixed_precision=False, error_report=False,
        fuse_attention=fuse_attention, quantize_embeddings=False,
        schemes=(parse_scheme("dynamic-s8-per-channel"),)))

    assert any("padding removal" in n and "real tokens" in n for n in result.notes)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "GatherND" in ops and ("QAttention" in ops) == fuse_attention
    feeds = _padded()  # a padded batch: the embeddings of int8 on real tokens stay those of fp32
    a = ort.InferenceSession(str(model)).run(None, feeds)[0]
    b = ort.InferenceSession(str(out)).run(None, feeds)[0]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.99


@pytest.mark.usefixtures("int8_faster")
def test_static_int8_on_real_tokens_keeps_int8_matmuls(tmp_path):
    """Packed tensors keep their rank: a 2-D MatMul + Add becomes a Gemm in onnxruntime, which its QDQ
    fusion does not take, and every weight was then dequantized on every run (MiniLM: 0.3x fp32)."""
    from onnxforge.pipeline.evaluate import Metric
    from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize

    model, calib = _pooled_encoder_and_sentences(tmp_path)
    out = tmp_path / "int8.onnx"
    result = quantize(model, out, calib, QuantizeConfig(
        metric=Metric.COSINE, tolerance=0.9, latency_rounds=2, mixed_precision=False, error_report=False,
        quantize_embeddings=False, schemes=(parse_scheme("qdq-u8s8-per-channel-matmul"),)))
    assert any("padding removal" in n and "real tokens" in n for n in result.notes)

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    ops = [n.op_type for n in optimized.node]
    assert "GatherND" in ops and "MatMulIntegerToFloat" in ops and "Gemm" not in ops
    constants = {i.name for i in optimized.initializer}
    assert not [n for n in optimized.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
