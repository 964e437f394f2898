"""Transformer fusions before quantizing: applied when something fuses and the outputs match, else the graph kept."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
from conftest import assert_numerically_equal
from transformer_graphs import encoder_feeds, make_encoder

from onnxforge.pipeline.quantize import transformer_fusion
from onnxforge.pipeline.quantize.graphs import qattention_ready
from onnxforge.pipeline.quantize.transformer_fusion import fuse_transformer, looks_like_transformer, padded_batch

H = 32


def make_block(seed: int = 0) -> onnx.ModelProto:
    """A post-LN transformer sub-block: self-attention scores, FFN, residual Add + LayerNormalization."""
    text = textwrap.dedent(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        block (float[N,T,{H}] x) => (float[N,T,{H}] y) {{
            q = MatMul (x, wq)
            k = MatMul (x, wk)
            kt = Transpose <perm = [0, 2, 1]> (k)
            s = MatMul (q, kt)
            p = Softmax <axis = -1> (s)
            v = MatMul (x, wv)
            a = MatMul (p, v)
            o = MatMul (a, wo)
            r = Add (o, x)
            y = LayerNormalization <axis = -1, epsilon = 0.00001> (r, gamma, beta)
        }}
        """
    )
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name in ("wq", "wk", "wv", "wo"):
        w = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(w, name))
    gamma = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(H)).astype(np.float32)
    model.graph.initializer.extend(
        [onnx.numpy_helper.from_array(gamma, "gamma"), onnx.numpy_helper.from_array(beta, "beta")]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(batch: int, tokens: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch * 100 + tokens).standard_normal((batch, tokens, H)).astype(np.float32)}


def test_residual_layernorm_is_fused_and_numerically_equal():
    model = make_block()
    assert looks_like_transformer(model)
    result = fuse_transformer(model)

    assert result.fused.get("SkipLayerNormalization") == 1
    ops = [n.op_type for n in result.model.graph.node]
    assert "SkipLayerNormalization" in ops and "LayerNormalization" not in ops
    assert "applied" in result.note
    assert_numerically_equal(model, result.model, [_feeds(1, 5), _feeds(3, 9)], atol=1e-4)


def test_graph_without_patterns_is_kept_as_given():
    model = make_block()
    # no residual Add in front of the normalization: nothing for SkipLayerNormalization to take
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            node.input[0] = "o"
    model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "Add"))
    result = fuse_transformer(model)

    assert result.fused == {}
    assert result.model is model
    assert "kept unfused" in result.note


def test_cnn_is_not_a_transformer(classifier):
    assert not looks_like_transformer(classifier)


# ----------------------------------------------------------------------------------------------
# Dynamo-shaped encoders: onnxscript ort_fusions, QAttention-ready masks, parity


def _samples():
    return [encoder_feeds(1, 5, seed=2, padded=False), encoder_feeds(3, 7, seed=3)]


def test_encoder_fuses_into_attention_with_mask_index_and_same_outputs():
    model = make_encoder(layers=2)
    result = fuse_transformer(model, _samples())

    assert result.fused == {"Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}
    assert result.masks_converted == 2 and "onnxscript" in result.note
    assert qattention_ready(result.model)  # packed weight is one initializer, no attention_bias left
    assert_numerically_equal(model, result.model, [encoder_feeds(2, 6, seed=5), encoder_feeds(4, 3, seed=6)],
                             atol=1e-4)


def test_dynamic_quantization_of_the_fused_encoder_uses_qattention(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused = tmp_path / "fused.onnx"
    onnx.save_model(fuse_transformer(make_encoder(), _samples()).model, str(fused))
    quantize_dynamic(str(fused), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Attention"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert "QAttention" in ops and "Attention" not in ops


def test_a_bias_that_is_not_a_key_padding_mask_stays_a_bias():
    model = make_encoder(mask_keeps=False)  # masks the kept keys: mask_index would mean the opposite
    result = fuse_transformer(model, _samples())

    assert result.fused.get("Attention") == 1 and result.masks_converted == 0
    assert not qattention_ready(result.model)
    assert_numerically_equal(model, result.model, encoder_feeds(2, 6, seed=5), atol=1e-4)


def test_fusions_that_change_the_outputs_are_not_kept(monkeypatch):
    model = make_encoder()
    fusions = transformer_fusion._onnxscript_fusions

    def broken(m):
        fused = fusions(m)
        for init in fused.graph.initializer:
            if init.name.startswith("w1"):  # the feed-forward weight, now wrong
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 2, init.name))
        return fused

    monkeypatch.setattr(transformer_fusion, "_onnxscript_fusions", broken)
    result = fuse_transformer(model, _samples())
    assert result.model is model and result.fused == {}
    assert "changed the outputs" in result.note


def test_padded_batch_pads_the_sequence_axis_with_zeros():
    a, b = encoder_feeds(1, 3, padded=False), encoder_feeds(1, 5, seed=4, padded=False)
    batch = padded_batch([a, b])
    assert batch["x"].shape == (2, 5, 16) and batch["mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert padded_batch([a, a]) is None  # nothing to pad
