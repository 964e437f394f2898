"""Padding never enters the importance statistics or the least-squares repair: tokens the attention
mask hides are rows the model never reads (tiny transformer graphs, tests/transformer_graphs.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from transformer_graphs import encoder_feeds, make_encoder

from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.prune.activations import real_rows, token_mask, token_rows
from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Importance, Repair, prune_model
from onnxforge.pipeline.prune.repair import repair_model


def _prune_and_repair(feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    model = make_encoder(layers=2, seed=3)
    calibration = SampleSet(feeds, None, "test")
    config = ChannelPruneConfig(ratio=0.5, head_ratio=0.5, importance=Importance.ACTIVATION, round_to=1,
                                repair=Repair.LEAST_SQUARES, calibration_data=Path("calib.npz"))
    pruned = prune_model(model, config, calibration)
    repaired, errors = repair_model(model, pruned, calibration, config)
    return {t.name: onnx.numpy_helper.to_array(t) for t in repaired.graph.initializer}, errors


def test_what_sits_at_padded_tokens_changes_nothing_in_the_pruned_and_repaired_model():
    feeds = encoder_feeds(batch=32, tokens=8, seed=4)
    weights, errors = _prune_and_repair(feeds)
    assert any("after" in e and e["after"] < e["before"] for e in errors.values())  # the repair did refit
    noisy = dict(feeds)
    pad = feeds["mask"] == 0
    noisy["x"] = feeds["x"].copy()
    noisy["x"][pad] = 50.0 * np.random.default_rng(9).standard_normal((int(pad.sum()), feeds["x"].shape[-1]))
    other, other_errors = _prune_and_repair(noisy)
    assert weights.keys() == other.keys()
    for name, array in weights.items():
        np.testing.assert_allclose(other[name], array, rtol=1e-5, atol=1e-6, err_msg=name)
    assert other_errors == errors


def test_the_token_mask_is_the_rank_2_integer_mask_input():
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    assert token_mask({"input_ids": np.zeros((2, 3), np.int64), "attention_mask": mask}).tolist() == \
        [[True, True, False], [True, False, False]]
    assert token_mask({"x": np.zeros((2, 3, 4), np.float32)}) is None
    assert token_mask({"attention_mask": np.full((2, 3), 5, np.int64)}) is None  # not a 0/1 mask
    assert token_mask({"mask": mask, "other_mask": mask}) is None  # which one masks the tokens is unknown
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    real = mask != 0
    np.testing.assert_array_equal(token_rows(x, real), x[real])
    np.testing.assert_array_equal(token_rows(x.reshape(6, 4), real), x[real])  # tokens already flattened
    assert real_rows(np.zeros((2, 4)), real) is None  # [N, D]: one row per sample, nothing to mask
