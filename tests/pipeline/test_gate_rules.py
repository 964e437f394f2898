"""The gate's rules beside the mean (issue 23): each one fails a candidate the mean alone would pass."""

from __future__ import annotations

import numpy as np
import pytest

from onnxforge.pipeline.evaluate import Metric, QualityGate, score
from onnxforge.pipeline.gate_rules import (
    are_ids,
    decoded_sequences,
    is_class_sequence,
    judge,
    paired_interval,
    position_agreement,
    sequence_changes,
)


def _judge(metric, outputs, reference, labels=None, **gate_options):
    first = reference[0]
    gate = QualityGate.resolve(metric, gate_options.pop("tolerance", None), labels is not None, first.shape,
                               ids=are_ids(first), sequence=is_class_sequence(first), **gate_options)
    value = score(gate.metric, outputs, reference, labels)
    return gate, judge(gate, outputs, reference, labels, value, score(gate.metric, reference, reference, labels))


# ----------------------------------------------------------------------------------------------
# The worst sample


def _embeddings(n=50, dim=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_one_bad_sample_passes_the_mean_cosine_but_fails_the_worst_sample_rule():
    ref = _embeddings(n=200, dim=64).reshape(200, 4, 16)  # hidden states: auto picks cosine
    out = ref + 0.01 * _embeddings(n=200, dim=64, seed=1).reshape(200, 4, 16)
    out[7] = _embeddings(n=1, dim=64, seed=2).reshape(4, 16)  # one sample unrelated to its reference
    gate, verdict = _judge(Metric.AUTO, [out], [ref])
    assert gate.metric is Metric.COSINE and not gate.sequence
    assert gate.passes(verdict.value, 1.0)  # 199 of 200 near 1: the mean rule alone passes it
    assert not verdict.passed
    assert verdict.worst_cosine is not None and verdict.worst_cosine < 0.5
    assert verdict.failures[0].startswith("worst sample's cosine")
    assert "worst sample's cosine >= 0.95" in gate.describe()


def test_mean_above_tolerance_with_one_bad_sample_is_still_caught():
    ref = _embeddings(n=200)
    out = ref + 0.001 * _embeddings(n=200, seed=1)
    out[3] = -ref[3] * 0.1 + _embeddings(n=1, seed=5)[0]
    gate, verdict = _judge(Metric.COSINE, [out], [ref])
    assert gate.passes(verdict.value, 1.0)  # the mean rule alone passes it
    assert not verdict.passed and verdict.failures[0].startswith("worst sample's cosine")


def test_every_sample_close_passes_every_rule():
    ref = _embeddings()
    _, verdict = _judge(Metric.COSINE, [ref + 0.01 * _embeddings(seed=1)], [ref])
    assert verdict.passed and not verdict.failures and verdict.worst_cosine > 0.95


def test_a_looser_cosine_tolerance_lowers_the_default_worst_floor_but_an_explicit_floor_holds():
    assert QualityGate.resolve(Metric.COSINE, 0.5, False, (4, 8)).worst_cosine == 0.5
    assert QualityGate.resolve(Metric.COSINE, 0.5, False, (4, 8), worst_cosine=0.9).worst_cosine == 0.9


# ----------------------------------------------------------------------------------------------
# Accuracy: its interval, and churn


def _logits(predictions: np.ndarray, classes: int = 10) -> np.ndarray:
    out = np.zeros((len(predictions), classes), np.float32)
    out[np.arange(len(predictions)), predictions] = 1.0
    return out


def _classifier_case(n=300, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    ref_pred = labels.copy()
    wrong = rng.choice(n, 60, replace=False)  # the input is right on 240 of 300 (80%)
    ref_pred[wrong] = (labels[wrong] + 1) % classes
    return labels, ref_pred, wrong


def test_a_drop_beyond_the_tolerance_fails_even_within_its_sampling_error_and_says_so():
    labels, ref_pred, wrong = _classifier_case()
    right = np.setdiff1d(np.arange(len(labels)), wrong)
    cand = ref_pred.copy()
    cand[right[:3]] = (labels[right[:3]] + 2) % 10  # -1.0 point: 3 of 300 samples newly wrong
    gate, verdict = _judge(Metric.AUTO, [_logits(cand)], [_logits(ref_pred)], labels)
    assert gate.metric is Metric.ACCURACY and gate.tolerance == 0.5
    assert not gate.passes(verdict.value, 0.8)  # beyond the 0.5-point tolerance on the mean alone
    low, high = verdict.interval
    assert low < -1.0 < high and high >= 0.0
    assert not verdict.passed, verdict.message()  # a measured drop is never forgiven as noise
    assert "-1.0 points, 95% CI [" in verdict.failures[0] and "more eval samples would tell" in verdict.failures[0]


def test_a_drop_beyond_its_sampling_error_fails():
    labels, ref_pred, wrong = _classifier_case()
    right = np.setdiff1d(np.arange(len(labels)), wrong)
    cand = ref_pred.copy()
    cand[right[:30]] = (labels[right[:30]] + 2) % 10  # -10 points
    _, verdict = _judge(Metric.AUTO, [_logits(cand)], [_logits(ref_pred)], labels, max_churn=50)
    assert verdict.interval[1] < 0
    assert not verdict.passed and verdict.failures[0].startswith("accuracy -10.0 points, 95% CI")


def test_the_same_accuracy_with_a_fifth_of_the_predictions_changed_fails_on_churn():
    labels, ref_pred, wrong = _classifier_case()
    cand = ref_pred.copy()
    cand[wrong[:57]] = (labels[wrong[:57]] + 3) % 10  # other wrong answers: accuracy unchanged, 19% churn
    _, verdict = _judge(Metric.AUTO, [_logits(cand)], [_logits(ref_pred)], labels)
    assert verdict.value == pytest.approx(0.8)
    assert verdict.churn == pytest.approx(0.19)
    assert not verdict.passed and "predictions changed on 19.0% of samples (allowed: 5%) FAILED" in verdict.failures


def test_paired_interval_is_the_normal_approximation_of_the_paired_difference():
    cand = np.array([1] * 90 + [0] * 10, bool)
    ref = np.array([1] * 95 + [0] * 5, bool)
    d = cand.astype(float) - ref
    half = 1.959964 * d.std(ddof=1) / np.sqrt(100) * 100
    assert paired_interval(cand, ref) == pytest.approx((-5 - half, -5 + half))
    assert paired_interval(ref, ref) == (0.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Sequences: per-position agreement


def _ctc(n=16, steps=20, classes=8, seed=0):
    """Softmax over classes at each position, with the top two classes nearly tied everywhere."""
    rng = np.random.default_rng(seed)
    probs = np.full((n, steps, classes), 0.11 / (classes - 2), np.float32)
    top = rng.integers(0, classes, (n, steps))
    second = (top + 1) % classes
    idx = np.indices((n, steps))
    probs[idx[0], idx[1], top] = 0.45
    probs[idx[0], idx[1], second] = 0.44
    return probs / probs.sum(-1, keepdims=True), top, second


def test_a_sequence_with_high_mean_cosine_but_flipped_positions_fails_per_position_agreement():
    ref, top, second = _ctc()
    cand = ref.copy()
    flip = np.random.default_rng(1).random(top.shape) < 0.3  # 30% of positions: the runner-up wins by a hair
    idx = np.nonzero(flip)
    cand[idx[0], idx[1], top[idx]] = ref[idx[0], idx[1], second[idx]]
    cand[idx[0], idx[1], second[idx]] = ref[idx[0], idx[1], top[idx]]
    assert is_class_sequence(ref)
    gate, verdict = _judge(Metric.AUTO, [cand], [ref])
    assert gate.metric is Metric.COSINE and gate.checks_positions
    assert verdict.value > 0.999 and verdict.worst_cosine > 0.99  # every cosine rule passes
    assert position_agreement(cand, ref) == pytest.approx(1 - flip.mean())
    assert not verdict.passed and verdict.failures[0].startswith("per-position top-1 agreement")
    assert "per-position top-1 agreement >= 95%" in gate.describe()


def _one_hot_lines(lines, classes=6, blank=0):
    """CTC-like softmax outputs [N, T, C] whose argmax at each frame is ``lines[n][t]``."""
    steps = max(len(line) for line in lines)
    probs = np.full((len(lines), steps, classes), 0.1, np.float32)
    for n, line in enumerate(lines):
        frames = list(line) + [blank] * (steps - len(line))
        probs[n, np.arange(steps), frames] = 0.5
    return probs / probs.sum(-1, keepdims=True)


def test_ctc_decoding_merges_runs_and_drops_the_blank():
    out = _one_hot_lines([[0, 1, 1, 0, 2, 0, 0], [3, 0, 3, 3, 0, 0, 0]])
    assert decoded_sequences(out, blank=0) == [(1, 2), (3, 3)]


def test_one_misread_line_among_many_frames_fails_by_default_though_every_other_rule_passes():
    lines = [[0, c, c, 0, (c + 1) % 5 + 1, 0, 0, 0, 0, 0] for c in range(1, 5)] * 10  # 40 lines, blank-dominated
    ref = _one_hot_lines(lines)
    misread = ref.copy()
    misread[7, 4, 5] = misread[7, 4].max() * 1.05  # one frame of one line: another character wins by a hair
    misread /= misread.sum(-1, keepdims=True)
    shifted = [list(line) for line in lines]
    shifted[3][1], shifted[3][3] = 0, lines[3][1]  # one line's character a frame later: reads the same
    gate, verdict = _judge(Metric.AUTO, [misread], [ref])
    assert gate.checks_sequences and "decoded sequences changed on <= 0% of samples" in gate.describe()
    assert verdict.value > 0.999 and verdict.worst_cosine > 0.95 and position_agreement(misread, ref) > 0.99
    assert not verdict.passed and verdict.failures == ("decoded sequences changed on 1 of 40 samples "
                                                       "(2.5%; allowed: <= 0%) FAILED",)
    assert verdict.sequence_churn == pytest.approx(1 / 40)
    assert sequence_changes(_one_hot_lines(shifted), ref) == 0.0
    shifted_verdict = _judge(Metric.AUTO, [_one_hot_lines(shifted)], [ref])[1]
    assert shifted_verdict.sequence_churn == 0.0
    assert not any(f.startswith("decoded") for f in shifted_verdict.failures)
    _, allowed = _judge(Metric.AUTO, [misread], [ref], max_churn=5)  # an explicit allowance
    assert allowed.passed


def test_the_search_keeps_the_resolved_sequence_allowance():
    ref = _one_hot_lines([[0, 1, 0]] * 4)
    gate = QualityGate.resolve(Metric.AUTO, None, False, ref.shape, sequence=True)
    assert (gate.max_churn, gate.sequence_churn) == (5.0, 0.0)
    again = QualityGate.resolve(gate.metric, gate.tolerance, False, ref.shape, max_churn=gate.max_churn,
                                sequence_churn=gate.sequence_churn, sequence=True)
    assert again == gate


def test_log_probabilities_are_a_sequence_too_and_hidden_states_are_not():
    ref, _, _ = _ctc()
    assert is_class_sequence(np.log(ref))
    assert not is_class_sequence(np.random.default_rng(0).normal(size=(4, 6, 32)).astype(np.float32))
    assert not is_class_sequence(ref[:, :, :1])


def test_position_agreement_can_be_the_metric_itself_for_raw_logits():
    logits = np.random.default_rng(0).normal(size=(4, 10, 5)).astype(np.float32)
    changed = logits.copy()
    changed[0, :5] = -changed[0, :5]  # 5 of 40 positions: their argmax moves
    agreement = score(Metric.POSITION_AGREEMENT, [changed], [logits], None)
    assert agreement == pytest.approx(position_agreement(changed, logits)) and agreement < 1.0
    gate = QualityGate.resolve(Metric.POSITION_AGREEMENT, None, False, logits.shape)
    assert not gate.passes(agreement, 1.0)  # default: at most 1 point of positions may change


def test_ragged_sequences_are_compared_sample_by_sample():
    ref, _, _ = _ctc(n=2, steps=6)
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = ref[0], ref[1, :4]
    assert is_class_sequence(rows)
    assert position_agreement(rows, rows) == 1.0


def test_noise_never_forgives_a_change_a_negative_tolerance_refuses():
    labels, ref_pred, _ = _classifier_case()
    _, verdict = _judge(Metric.AUTO, [_logits(ref_pred)], [_logits(ref_pred)], labels, tolerance=-1.0)
    assert verdict.interval == (0.0, 0.0) and not verdict.passed  # no change, but +1 point was asked for


# ----------------------------------------------------------------------------------------------
# Through a stage: the rules gate it, and its failure names the rule


def test_a_stage_backs_off_from_a_try_that_changes_too_many_predictions_and_says_which_rule(
        tmp_path, classifier_path, eval_npz):
    from onnxforge.errors import QualityGateError
    from onnxforge.pipeline.prune.magnitude import MagnitudePruneConfig, prune_magnitude

    # 95% of the weights zeroed: within a 100-point accuracy tolerance, not within 0 points of churn
    config = MagnitudePruneConfig(sparsity=0.95, eval_data=eval_npz, tolerance=100, max_churn=0)
    try:
        tried = prune_magnitude(classifier_path, tmp_path / "p.onnx", config).tried
    except QualityGateError as e:  # no sparsity down to the floor kept every prediction
        assert "predictions changed on <= 0% of samples" in e.message
        tried = e.result["tried"]
    first = tried[0]
    assert first["sparsity"] == 0.95 and not first["passes"]
    assert "predictions changed on" in first["gate"] and first["gate"].split("; ")[0].endswith("FAILED")
    assert "95% CI" in first["gate"]
    assert all(t["passes"] == ("FAILED" not in t["gate"]) for t in tried)


# ----------------------------------------------------------------------------------------------
# Class ids: a model with its argmax inside (a captcha reader returns [1, T] character ids)


def test_a_class_id_per_sample_is_compared_as_the_class_itself_not_its_argmax():
    ref = np.arange(40, dtype=np.int64) % 7
    changed = ref.copy()
    changed[:10] = (changed[:10] + 1) % 7  # a quarter of the answers
    gate, verdict = _judge(Metric.AUTO, [changed], [ref])
    assert gate.metric is Metric.AGREEMENT and not gate.sequence
    assert verdict.value == pytest.approx(0.75) and not verdict.passed  # argmax of one id is always 0: 100%
    labels = ref.copy()
    gate, verdict = _judge(Metric.AUTO, [changed.reshape(40, 1)], [ref.reshape(40, 1)], labels)
    assert gate.metric is Metric.ACCURACY and verdict.value == pytest.approx(0.75)
    assert verdict.churn == pytest.approx(0.25)


def test_a_sequence_of_ids_is_judged_by_position_and_by_what_it_reads():
    lines = np.array([[0, c, c, 0, (c % 5) + 1, 0, 0, 0] for c in range(1, 6)] * 8, dtype=np.int64)
    misread = lines.copy()
    misread[11, 4] = 9  # one id of one line
    gate, verdict = _judge(Metric.AUTO, [misread], [lines])
    assert gate.metric is Metric.POSITION_AGREEMENT and gate.sequence and gate.checks_sequences
    assert verdict.value == pytest.approx(1 - 1 / lines.size)  # within the 1-point per-position tolerance
    assert not verdict.passed and verdict.failures[0].startswith("decoded sequences changed on 1 of 40 samples")
    shifted = lines.copy()
    shifted[0, 1:3] = [0, lines[0, 1]]  # a character a frame later reads the same
    assert sequence_changes(shifted, lines) == 0.0


def test_ragged_id_sequences_of_different_lengths_are_changed_sequences():
    ref = np.empty(2, dtype=object)
    ref[0], ref[1] = np.array([[0, 3, 3, 0]]), np.array([[0, 2, 0, 4, 0, 0]])
    out = np.empty(2, dtype=object)
    out[0], out[1] = np.array([[0, 3, 0, 0]]), np.array([[0, 2, 0, 0, 0, 0]])
    assert is_class_sequence(ref) and position_agreement(out, ref) == pytest.approx(8 / 10)
    assert sequence_changes(out, ref) == pytest.approx(0.5)
