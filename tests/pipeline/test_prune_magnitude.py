"""Magnitude pruning: the smallest weights become zero, nothing else changes, and with evaluation
data the sparsity backs off until the quality gate holds."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from conftest import assert_numerically_equal, make_classifier, random_images, write_npz

from onnxforge.errors import QualityGateError, UsageError
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.prune.magnitude import MagnitudePruneConfig, Scope, prune_magnitude, sparsify_model


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _with_weights(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(onnx.numpy_helper.from_array(arrays[init.name], init.name))
    return out


def _expected_per_layer(weights: dict[str, np.ndarray], names, sparsity: float) -> dict[str, np.ndarray]:
    expected = dict(weights)
    for name in names:
        w = weights[name]
        threshold = np.quantile(np.abs(w), sparsity)
        expected[name] = np.where(np.abs(w) < threshold, 0, w).astype(w.dtype)
    return expected


@pytest.fixture
def feeds_two_batches():
    return [{"x": random_images(1, seed=7)}, {"x": random_images(4, seed=8)}]


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_per_layer_zeroes_the_smallest_weights_of_each_layer(classifier, sparsity, feeds_two_batches):
    pruned, achieved, layers, skipped = sparsify_model(classifier, MagnitudePruneConfig(sparsity=sparsity))
    before, after = _weights(classifier), _weights(pruned)
    assert len(layers) == 2 and skipped == []
    for name in ("conv_w", "fc_w"):
        zero = after[name] == 0
        assert zero.mean() == pytest.approx(sparsity, abs=0.01)
        # every zeroed weight was no larger than every kept one
        assert np.abs(before[name][zero]).max() <= np.abs(before[name][~zero]).min()
        np.testing.assert_array_equal(after[name][~zero], before[name][~zero])
    # biases are not weights to prune
    np.testing.assert_array_equal(after["conv_b"], before["conv_b"])
    np.testing.assert_array_equal(after["fc_b"], before["fc_b"])
    assert achieved == pytest.approx(sparsity, abs=0.01)
    # the rewritten graph computes exactly what the same weights zeroed by hand compute
    expected = _with_weights(classifier, _expected_per_layer(before, ["conv_w", "fc_w"], sparsity))
    assert_numerically_equal(expected, pruned, feeds_two_batches, atol=0, rtol=0)


def test_global_scope_uses_one_threshold_for_all_layers(classifier):
    pruned, achieved, _, _ = sparsify_model(classifier, MagnitudePruneConfig(sparsity=0.5, scope=Scope.GLOBAL))
    before, after = _weights(classifier), _weights(pruned)
    everything = np.concatenate([np.abs(before[n]).ravel() for n in ("conv_w", "fc_w")])
    threshold = np.quantile(everything, 0.5)
    for name in ("conv_w", "fc_w"):
        np.testing.assert_array_equal(after[name] == 0, np.abs(before[name]) < threshold)
    # the fc weights are smaller (scale 0.1 vs 0.3), so a global threshold prunes them harder
    assert (after["fc_w"] == 0).mean() > 0.5 > (after["conv_w"] == 0).mean()
    assert achieved == pytest.approx(0.5, abs=0.01)


def test_small_and_excluded_layers_are_left_dense(classifier):
    model = make_classifier()
    model.graph.node[0].name = "conv"
    model.graph.node[3].name = "fc"
    pruned, _, layers, skipped = sparsify_model(model, MagnitudePruneConfig(sparsity=0.5, exclude_nodes=("fc",)))
    assert layers == ["conv"]
    assert skipped == ["fc (excluded)"]
    np.testing.assert_array_equal(_weights(pruned)["fc_w"], _weights(model)["fc_w"])

    # conv_w holds 4*3*3*3 = 108 weights: below min_params=200 it stays dense
    pruned, _, layers, skipped = sparsify_model(model, MagnitudePruneConfig(sparsity=0.5, min_params=200))
    assert layers == ["fc"]
    assert skipped == ["conv (only 108 weights)"]
    np.testing.assert_array_equal(_weights(pruned)["conv_w"], _weights(model)["conv_w"])


def test_zero_sparsity_changes_nothing(classifier, feeds_two_batches):
    pruned, achieved, _, _ = sparsify_model(classifier, MagnitudePruneConfig(sparsity=0.0))
    assert achieved == 0.0
    assert_numerically_equal(classifier, pruned, feeds_two_batches, atol=0, rtol=0)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 2.0])
def test_sparsity_out_of_range_is_refused(sparsity):
    with pytest.raises(UsageError, match="sparsity"):
        MagnitudePruneConfig(sparsity=sparsity)


def test_prune_file_reports_sizes_and_writes_the_model(tmp_path, classifier_path, feeds_two_batches):
    output = tmp_path / "sparse.onnx"
    result = prune_magnitude(classifier_path, output, MagnitudePruneConfig(sparsity=0.6))
    assert result.path == output
    assert result.requested_sparsity == 0.6
    assert result.achieved_sparsity == pytest.approx(0.6, abs=0.01)
    assert result.gzip_bytes_after < result.gzip_bytes_before  # zeros compress
    assert result.score_before is None and result.gate is None  # no eval data, no gate
    expected, _, _, _ = sparsify_model(onnx.load(str(classifier_path)), MagnitudePruneConfig(sparsity=0.6))
    assert_numerically_equal(expected, output, feeds_two_batches, atol=0, rtol=0)


def test_with_eval_data_sparsity_backs_off_until_the_gate_holds(tmp_path, classifier_path, eval_npz):
    config = MagnitudePruneConfig(sparsity=0.9, eval_data=eval_npz, metric=Metric.COSINE, tolerance=0.99)
    result = prune_magnitude(classifier_path, tmp_path / "p.onnx", config)
    tried = result.tried
    assert tried[0]["sparsity"] == 0.9 and not tried[0]["passes"]
    assert tried[-1]["passes"] and all(not t["passes"] for t in tried[:-1])
    sparsities = [t["sparsity"] for t in tried]
    assert sparsities == sorted(sparsities, reverse=True)
    for a, b in itertools.pairwise(sparsities):
        assert b == pytest.approx(a * 0.75, abs=1e-3)
    assert result.achieved_sparsity == pytest.approx(tried[-1]["achieved"], abs=1e-3)
    assert result.score_after >= 0.99
    assert result.score_before == pytest.approx(1.0)
    assert "cosine" in result.gate
    # the saved file really is the model that was scored
    from conftest import run_model

    data = np.load(eval_npz)
    got = run_model(tmp_path / "p.onnx", {"x": data["x"]})[0]
    ref = run_model(classifier_path, {"x": data["x"]})[0]
    cos = np.mean(np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1)))
    assert cos == pytest.approx(result.score_after, abs=1e-6)


def test_gate_that_passes_at_once_keeps_the_requested_sparsity(tmp_path, classifier_path, eval_npz):
    config = MagnitudePruneConfig(sparsity=0.3, eval_data=eval_npz, metric=Metric.COSINE, tolerance=0.0)
    result = prune_magnitude(classifier_path, tmp_path / "p.onnx", config)
    assert len(result.tried) == 1
    assert result.achieved_sparsity == pytest.approx(0.3, abs=0.01)


def test_impossible_gate_saves_the_dense_model_and_raises(tmp_path, classifier_path, eval_npz, feeds_two_batches):
    output = tmp_path / "p.onnx"
    config = MagnitudePruneConfig(sparsity=0.5, eval_data=eval_npz, metric=Metric.REL_ERROR, tolerance=-1.0)
    with pytest.raises(QualityGateError) as info:
        prune_magnitude(classifier_path, output, config)
    assert info.value.exit_code == 4
    assert info.value.best_path == str(output)
    # the same message as the other prune stages (checks.gate_missed): the input's score and the best try's
    assert "the input scores" in info.value.message and "the best try (sparsity " in info.value.message
    assert info.value.hint.startswith("loosen --tolerance (now ")
    assert_numerically_equal(classifier_path, output, feeds_two_batches, atol=0, rtol=0)


def test_eval_without_labels_uses_agreement(tmp_path, classifier_path):
    data = write_npz(tmp_path / "unlabelled.npz", x=random_images(32, seed=9))
    result = prune_magnitude(classifier_path, tmp_path / "p.onnx",
                             MagnitudePruneConfig(sparsity=0.2, eval_data=data, tolerance=100))
    assert "agreement" in result.gate
