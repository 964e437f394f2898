"""Transformer fusions before quantizing: applied when the optimizer fuses, otherwise the graph kept."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx

from conftest import assert_numerically_equal
from onnxforge.pipeline.quantize.transformer_fusion import fuse_transformer, looks_like_transformer

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
