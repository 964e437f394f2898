"""A tiny BERT-style encoder written as ONNX text, shaped like a dynamo export (imported by tests).

Post-LN layers: Q/K/V projections with bias, heads split by Reshape/Transpose, scores scaled and
masked by an additive key-padding bias computed from ``mask`` ([B, S] of 0/1), Softmax, output
projection, residual Add + LayerNormalization, an erf-GELU feed-forward, residual + LayerNormalization.
onnxscript's ort_fusions turn each layer into Attention + 2 SkipLayerNormalization + BiasGelu.
With ``vocab`` the input is token ids (``ids``) looked up in a [vocab, hidden] embedding table.
"""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnx.parser

HIDDEN, HEADS = 16, 2


def make_encoder(layers: int = 1, seed: int = 0, *, vocab: int | None = None, mask_keeps: bool = True,
                 outlier: float = 1.0) -> onnx.ModelProto:
    """The encoder above. ``mask_keeps=False`` inverts the bias (masks the *kept* keys: not a key-padding
    mask); ``outlier`` scales channel 3 of every LayerNorm gamma (a systematic activation outlier)."""
    h, hd = HIDDEN, HIDDEN // HEADS
    masked = "inv" if mask_keeps else "maskf"
    body = [textwrap.dedent(f"""
        maskf = Cast <to = 1> (mask)
        inv = Sub (one, maskf)
        neg = Mul ({masked}, big)
        bias1 = Unsqueeze (neg, axes12)
        mshape = Shape (mask)
        mb = Slice (mshape, zero1, one1)
        ms = Slice (mshape, one1, two1)
        full = Concat <axis = 0> (mb, one1, ms, ms)
        bias = Expand (bias1, full)
    """)]
    if vocab:
        body.append("x = Gather <axis = 0> (table, ids)\n")
    prev = "x"
    for i in range(layers):
        body.append(textwrap.dedent(f"""
            q{i}m = MatMul ({prev}, wq{i})
            q{i}a = Add (q{i}m, bq{i})
            q{i}r = Reshape (q{i}a, heads)
            q{i}t = Transpose <perm = [0, 2, 1, 3]> (q{i}r)
            k{i}m = MatMul ({prev}, wk{i})
            k{i}a = Add (k{i}m, bk{i})
            k{i}r = Reshape (k{i}a, heads)
            k{i}t = Transpose <perm = [0, 2, 3, 1]> (k{i}r)
            v{i}m = MatMul ({prev}, wv{i})
            v{i}a = Add (v{i}m, bv{i})
            v{i}r = Reshape (v{i}a, heads)
            v{i}t = Transpose <perm = [0, 2, 1, 3]> (v{i}r)
            s{i} = MatMul (q{i}t, k{i}t)
            s{i}s = Div (s{i}, scale)
            s{i}m = Add (s{i}s, bias)
            p{i} = Softmax <axis = -1> (s{i}m)
            c{i} = MatMul (p{i}, v{i}t)
            c{i}t = Transpose <perm = [0, 2, 1, 3]> (c{i})
            c{i}r = Reshape (c{i}t, merge)
            o{i}m = MatMul (c{i}r, wo{i})
            o{i}a = Add (o{i}m, bo{i})
            r{i} = Add (o{i}a, {prev})
            n{i} = LayerNormalization <axis = -1, epsilon = 0.000001> (r{i}, g1{i}, b1{i})
            f{i}m = MatMul (n{i}, w1{i})
            f{i}a = Add (f{i}m, c1{i})
            f{i}d = Div (f{i}a, sqrt2)
            f{i}e = Erf (f{i}d)
            f{i}p = Add (f{i}e, one)
            f{i}h = Mul (f{i}a, f{i}p)
            f{i}g = Mul (f{i}h, half)
            f{i}o = MatMul (f{i}g, w2{i})
            f{i}b = Add (f{i}o, c2{i})
            r2{i} = Add (f{i}b, n{i})
            y{i} = LayerNormalization <axis = -1, epsilon = 0.000001> (r2{i}, g2{i}, b2{i})
        """))
        prev = f"y{i}"
    body.append(f"y = Identity ({prev})\n")
    source = "int64[B,S] ids" if vocab else f"float[B,S,{h}] x"
    text = (f'<ir_version: 8, opset_import: ["" : 17]>\n'
            f"encoder ({source}, int64[B,S] mask) => (float[B,S,{h}] y) {{\n{''.join(body)}}}\n")
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)

    def add(name: str, array) -> None:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))

    add("one", np.float32(1))
    add("big", np.float32(-10000))
    add("axes12", np.array([1, 2], np.int64))
    for name, value in (("zero1", 0), ("one1", 1), ("two1", 2)):
        add(name, np.array([value], np.int64))
    add("heads", np.array([0, 0, HEADS, hd], np.int64))
    add("merge", np.array([0, 0, h], np.int64))
    add("scale", np.float32(np.sqrt(hd)))
    add("sqrt2", np.float32(np.sqrt(2)))
    add("half", np.float32(0.5))
    if vocab:
        add("table", rng.standard_normal((vocab, h)).astype(np.float32))
    for i in range(layers):
        for name in ("wq", "wk", "wv", "wo"):
            add(f"{name}{i}", (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32))
        for name in ("bq", "bk", "bv", "bo", "b1", "b2", "c2"):
            add(f"{name}{i}", (0.1 * rng.standard_normal(h)).astype(np.float32))
        for name in ("g1", "g2"):
            gamma = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
            gamma[3] *= outlier
            add(f"{name}{i}", gamma)
        add(f"w1{i}", (rng.standard_normal((h, 4 * h)) / np.sqrt(h)).astype(np.float32))
        add(f"c1{i}", (0.1 * rng.standard_normal(4 * h)).astype(np.float32))
        add(f"w2{i}", (rng.standard_normal((4 * h, h)) / np.sqrt(4 * h)).astype(np.float32))
    onnx.checker.check_model(model, full_check=True)
    return model


def encoder_feeds(batch: int = 2, tokens: int = 6, seed: int = 1, *, vocab: int | None = None,
                  padded: bool = True) -> dict[str, np.ndarray]:
    """Inputs for ``make_encoder``: random activations (or token ids), a mask with the tail of every
    other row padded when ``padded``."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, tokens), np.int64)
    if padded:
        mask[1::2, tokens // 2:] = 0
    source = ({"ids": rng.integers(0, vocab, (batch, tokens)).astype(np.int64)} if vocab
              else {"x": rng.standard_normal((batch, tokens, HIDDEN)).astype(np.float32)})
    return source | {"mask": mask}
