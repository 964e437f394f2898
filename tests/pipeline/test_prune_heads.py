"""Attention heads and FFN neurons pruned on tiny transformer graphs (tests/transformer_graphs.py):
the pruned graph runs with the right shapes, removed units that are dead or duplicated come back
exactly (the V-bias fold, the least-squares repair), and attention it does not understand is refused."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_numerically_equal
from transformer_graphs import HEADS, HIDDEN, encoder_feeds, make_encoder

from onnxforge.errors import UsageError
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Importance, Repair, prune_model
from onnxforge.pipeline.prune.repair import repair_model

D = HIDDEN // HEADS


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _with(model: onnx.ModelProto, **arrays: np.ndarray) -> onnx.ModelProto:
    """``model`` with the initializers named in ``arrays`` replaced."""
    for init in model.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(onnx.numpy_helper.from_array(arrays[init.name].astype(np.float32), init.name))
    return model


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n.name or n.output[0]: inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul"
            and n.input[1] in inits}


def test_heads_and_ffn_neurons_are_cut_together_and_the_model_runs():
    model = make_encoder(layers=2)
    pruned = prune_model(model, ChannelPruneConfig(ratio=0.5, head_ratio=0.5, round_to=8, repair=Repair.NONE))
    assert pruned.pruned_layers == {"o0m": "2 -> 1 heads", "o1m": "2 -> 1 heads", "f0m": "64 -> 32",
                                    "f1m": "64 -> 32"}
    shapes = _shapes(pruned.model)
    for i in range(2):
        assert shapes[f"q{i}m"] == shapes[f"k{i}m"] == shapes[f"v{i}m"] == (HIDDEN, D)  # one head of Q, K, V
        assert shapes[f"o{i}m"] == (D, HIDDEN)
        assert shapes[f"f{i}m"] == (HIDDEN, 32) and shapes[f"f{i}o"] == (32, HIDDEN)
    constants = {tuple(onnx.numpy_helper.to_array(t).tolist()) for t in pruned.model.graph.initializer
                 if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1 and t.dims[0] in (3, 4)}
    assert (0, 0, 1, D) in constants and (0, 0, D) in constants  # the head-count reshape constants follow
    assert (0, 0, HEADS, D) not in constants and (0, 0, HIDDEN) not in constants
    for batch, tokens in ((1, 3), (4, 7)):
        assert _run(pruned.model, encoder_feeds(batch, tokens)).shape == (batch, tokens, HIDDEN)
    assert sorted(pruned.repair_layers) == ["f0o", "f1o", "o0m", "o1m"]  # Wo and W2 are refit


def test_a_head_whose_values_are_constant_is_removed_exactly_by_the_bias_fold():
    # head 1 of every layer reads nothing (its V columns are zero): its output is bv_1 Wo_1 whatever the
    # attention, and l2 importance ranks it last. Removing it and folding bv_1 Wo_1 into bo is exact.
    model = make_encoder(layers=2, seed=3)
    weights = _weights(model)
    arrays = {}
    for i in range(2):
        wv = weights[f"wv{i}"]
        wv[:, D:] = 0.0
        arrays[f"wv{i}"] = wv
    model = _with(model, **arrays)
    pruned = prune_model(model, ChannelPruneConfig(ratio=0.0, head_ratio=0.5, repair=Repair.NONE))
    assert pruned.pruned_layers == {"o0m": "2 -> 1 heads", "o1m": "2 -> 1 heads"}
    assert_numerically_equal(model, pruned.model, [encoder_feeds(2, 6), encoder_feeds(3, 5, seed=4)])


def _duplicated(seed: int) -> onnx.ModelProto:
    """make_encoder with head 1 a copy of head 0 (Q/K/V slices and biases) whose Wo rows are small, and
    FFN neurons 32..63 copies of 0..31 whose W2 rows are small: each removed unit's work can be moved
    onto its twin, so the least-squares repair recovers the output exactly."""
    model = make_encoder(layers=2, seed=seed)
    weights = _weights(model)
    rng = np.random.default_rng(seed + 100)
    arrays = {}
    for i in range(2):
        for name in ("wq", "wk", "wv"):
            w = weights[f"{name}{i}"]
            w[:, D:] = w[:, :D]
            arrays[f"{name}{i}"] = w
        for name in ("bq", "bk", "bv"):
            b = weights[f"{name}{i}"]
            b[D:] = b[:D]
            arrays[f"{name}{i}"] = b
        wo = weights[f"wo{i}"]
        wo[D:] = 0.03 * rng.standard_normal((D, HIDDEN))
        arrays[f"wo{i}"] = wo
        w1, c1, w2 = weights[f"w1{i}"], weights[f"c1{i}"], weights[f"w2{i}"]
        w1[:, 32:], c1[32:] = w1[:, :32], c1[:32]
        w2[32:] = 0.01 * rng.standard_normal((32, HIDDEN))
        arrays.update({f"w1{i}": w1, f"c1{i}": c1, f"w2{i}": w2})
    return _with(model, **arrays)


def _samples(n: int, seed: int) -> dict[str, np.ndarray]:
    return encoder_feeds(n, 6, seed=seed)


def test_duplicated_heads_and_neurons_are_recovered_exactly_by_the_repair():
    model = _duplicated(seed=5)
    calibration = SampleSet(_samples(48, 7), None, "test")
    config = ChannelPruneConfig(ratio=0.5, head_ratio=0.5, round_to=8, importance=Importance.ACTIVATION,
                                repair=Repair.LEAST_SQUARES, calibration_data=Path("calib.npz"), ridge=0.0)
    pruned = prune_model(model, config, calibration)
    assert pruned.pruned_layers == {"o0m": "2 -> 1 heads", "o1m": "2 -> 1 heads", "f0m": "64 -> 32",
                                    "f1m": "64 -> 32"}
    repaired, errors = repair_model(model, pruned, calibration, config)
    assert sorted(errors) == ["f0o", "f1o", "o0m", "o1m"]
    assert all(e["after"] < 1e-8 < e["before"] for e in errors.values()), errors
    held_out = _samples(8, 9)
    reference = _run(model, held_out)
    error_pruned = np.abs(_run(pruned.model, held_out) - reference).max()
    assert error_pruned > 1e-3  # the small twins carried something
    assert_numerically_equal(model, repaired, [held_out, encoder_feeds(1, 3, seed=10)], atol=1e-4)


def test_activation_importance_removes_the_small_twins():
    model = _duplicated(seed=6)
    calibration = SampleSet(_samples(16, 8), None, "test")
    config = ChannelPruneConfig(ratio=0.5, head_ratio=0.5, round_to=8, importance=Importance.ACTIVATION,
                                repair=Repair.NONE, calibration_data=Path("calib.npz"))
    pruned = prune_model(model, config, calibration)
    weights = _weights(model)
    shapes = _shapes(pruned.model)
    kept = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.model.graph.initializer}
    for i in range(2):
        node = next(n for n in pruned.model.graph.node if n.name == f"o{i}m" or n.output[0] == f"o{i}m")
        np.testing.assert_array_equal(kept[node.input[1]], weights[f"wo{i}"][:D])  # head 0 stayed
        assert shapes[f"f{i}o"] == (32, HIDDEN)
        node = next(n for n in pruned.model.graph.node if n.output[0] == f"f{i}o")
        np.testing.assert_array_equal(kept[node.input[1]], weights[f"w2{i}"][:32])  # the big neurons stayed


def _fused() -> onnx.ModelProto:
    text = textwrap.dedent("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        fused (float[B,S,16] x) => (float[B,S,16] y) {
            a = com.microsoft.Attention <num_heads = 2> (x, w, b)
            y = MatMul (a, wo)
        }
    """)
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in (("w", (16, 48)), ("b", (48,)), ("wo", (16, 16))):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32),
                                                                    name))
    return model


def test_fused_attention_is_refused_in_one_line():
    with pytest.raises(UsageError, match="fused attention \\(Attention\\)") as info:
        prune_model(_fused(), ChannelPruneConfig(ratio=0.0, head_ratio=0.5, repair=Repair.NONE))
    assert "\n" not in info.value.message


def test_attention_without_heads_it_can_follow_is_refused():
    # single-head attention with no Reshape into heads (what tests/pipeline/test_transformer_fusion.py builds)
    text = textwrap.dedent("""
        <ir_version: 8, opset_import: ["" : 17]>
        block (float[N,T,8] x) => (float[N,T,8] y) {
            q = MatMul (x, wq)
            k = MatMul (x, wk)
            kt = Transpose <perm = [0, 2, 1]> (k)
            s = MatMul (q, kt)
            p = Softmax <axis = -1> (s)
            v = MatMul (x, wv)
            a = MatMul (p, v)
            y = MatMul (a, wo)
        }
    """)
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name in ("wq", "wk", "wv", "wo"):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32),
                                                                    name))
    with pytest.raises(UsageError, match="attention not understood"):
        prune_model(model, ChannelPruneConfig(ratio=0.0, head_ratio=0.5, repair=Repair.NONE))


def test_head_ratio_on_a_model_without_attention_is_a_clear_error():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        dense (float[N,8] x) => (float[N,8] y) { h = MatMul (x, w1)  y = MatMul (h, w2) }""")
    for name in ("w1", "w2"):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), name))
    with pytest.raises(UsageError, match="no attention heads found"):
        prune_model(model, ChannelPruneConfig(ratio=0.0, head_ratio=0.5, repair=Repair.NONE))
    # with channels to prune it goes on (the search varies --head-ratio on models without attention too)
    pruned = prune_model(model, ChannelPruneConfig(ratio=0.5, head_ratio=0.5, repair=Repair.NONE, round_to=1))
    assert pruned.pruned_layers == {"h": "8 -> 4"}
    assert "no attention heads" in pruned.skipped_layers["attention"]
    with pytest.raises(UsageError, match="--head-ratio"):
        ChannelPruneConfig(ratio=0.5, head_ratio=1.0)
    with pytest.raises(UsageError, match="--ratio"):
        ChannelPruneConfig(ratio=0.0)  # nothing to remove


def test_cli_prunes_heads_and_neurons_with_repair_and_gate(tmp_path, cli):
    model = _duplicated(seed=11)
    path = tmp_path / "enc.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", **_samples(40, 12))
    out, report = tmp_path / "small.onnx", tmp_path / "r.json"
    code, _, err = cli("prune", path, "-o", out, "--method", "channels", "--ratio", "0.5", "--head-ratio", "0.5",
                            "--round-to", "8", "--importance", "activation", "--calibration", tmp_path / "calib.npz",
                            "--objective", "size", "--json", report)
    assert code == 0, err
    result = json.loads(report.read_text())
    assert result["pruned_layers"]["o0m"] == "2 -> 1 heads" and result["pruned_layers"]["f1m"] == "64 -> 32"
    assert result["repaired"] and result["quality_measured"]
    assert result["score_after"] > 0.999  # cosine on held-out calibration samples


def test_cli_fused_attention_exits_2_with_one_line(tmp_path, cli):
    path = tmp_path / "fused.onnx"
    onnx.save(_fused(), path)
    out = tmp_path / "p.onnx"
    code, stdout, err = cli("prune", path, "-o", out, "--method", "channels", "--ratio", "0.5", "--head-ratio", "0.25")
    assert code == 2 and "fused attention" in err
    assert len([line for line in err.splitlines() if line.strip() and not line.lstrip().startswith("hint")]) == 1
    assert not out.exists() and "Traceback" not in err + stdout


def test_the_search_varies_head_ratio_only_on_models_with_attention():
    from onnxforge.pipeline.search.space import SearchSpace

    encoder = make_encoder(layers=1)
    dense = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        dense (float[N,8] x) => (float[N,8] y) { y = Relu (x) }""")
    with_heads = SearchSpace("cpu", ("prune_channels", "quantize"), model=encoder)
    assert "head_ratio" in {k.field for k in with_heads.knobs["prune_channels"]}
    without = SearchSpace("cpu", ("prune_channels", "quantize"), model=dense)
    assert "head_ratio" not in {k.field for k in without.knobs.get("prune_channels", ())}
    assert "prune_channels" in without.inapplicable  # no channel group and no attention: nothing to act on
    blind = SearchSpace("cpu", ("prune_channels",))  # no model: every knob, so a pinned value can be checked
    assert "head_ratio" in {k.field for k in blind.knobs["prune_channels"]}


def test_the_back_off_never_builds_the_same_head_count_twice(tmp_path):
    from onnxforge.errors import QualityGateError
    from onnxforge.pipeline.prune.channels import prune_channels

    path = tmp_path / "enc.onnx"
    onnx.save(make_encoder(layers=1, seed=2), path)
    np.savez(tmp_path / "calib.npz", **_samples(40, 13))
    # 0.5 of 2 heads removes one; 0.375 and 0.28 remove one too (whole heads); 0.21 removes none: one try
    config = ChannelPruneConfig(ratio=0.0, head_ratio=0.5, calibration_data=tmp_path / "calib.npz",
                                tolerance=0.9999999)
    with pytest.raises(QualityGateError) as info:
        prune_channels(path, tmp_path / "p.onnx", config)
    tried = info.value.result["tried"]
    assert [t["head_ratio"] for t in tried] == [0.5]
    assert info.value.exit_code == 4 and (tmp_path / "p.onnx").exists()  # the input, kept
