"""Raw CTC scores (a recognizer without its softmax, like ddddocr's captcha reader: ``Gemm -> Reshape`` to
``[T, 1, 8210]``) are judged as classes: per position and by decoded sequence, not by cosine alone (issue 23:
a low-rank captcha reader at mean cosine 0.990 read 16 of 32 captchas against the input's 30, exit 0). And
text labels (a captcha's characters) reach a user metric."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import save, write_npz
from onnx_graphs import model_from_text

from onnxforge.errors import CalibrationDataError
from onnxforge.pipeline.calibration import load_samples
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.gate_rules import is_class_sequence
from onnxforge.pipeline.output_heads import is_linear_head
from onnxforge.pipeline.reference import Reference

STEPS, FEATURES, CLASSES = 10, 4, 6


def _reader(weight: np.ndarray, bias: np.ndarray | None = None):
    """frames [N, T, 4] -> raw scores [T, N, 6] (sequence first, as ddddocr's reader returns them)."""
    return model_from_text(
        """
        s = MatMul(x, w)
        b = Add(s, bias)
        y = Transpose<perm = [1, 0, 2]>(b)
        """,
        {"w": weight.astype(np.float32), "bias": np.zeros(CLASSES, np.float32) if bias is None else bias},
        f"float[N, {STEPS}, {FEATURES}] x", f"float[{STEPS}, N, {CLASSES}] y",
    )


def _weight() -> np.ndarray:
    """Feature k scores class k by 40 (k = 0: the blank)."""
    w = np.zeros((FEATURES, CLASSES), np.float32)
    w[np.arange(FEATURES), np.arange(FEATURES)] = 40.0
    return w


def _confused_reader():
    """Class 4 gains a bias of 2 and 37 of feature 3: a faint 3 (0.6: 24 against 24.2) now reads 4."""
    w = _weight()
    w[3, 4] = 37.0
    return _reader(w, np.array([0, 0, 0, 0, 2, 0], np.float32))


def _frames(n: int = 40, seed: int = 0) -> np.ndarray:
    """Lines of 2 characters (1 or 2) among blank frames (the blank tops 80% of the frames), and in line 5
    one faint character 3."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, STEPS, FEATURES), np.float32)
    x[:, :, 0] = 1.0
    for i in range(n):
        for t, c in zip(rng.choice(STEPS, 2, replace=False), rng.integers(1, 3, 2), strict=True):
            x[i, t] = np.eye(FEATURES)[c]
    x[5, np.argmax(x[5, :, 0])] = [0.0, 0.0, 0.0, 0.6]
    return x + 0.05 * rng.random(x.shape, dtype=np.float32)


def test_raw_scores_of_a_linear_layer_are_judged_by_what_they_read(tmp_path):
    data = write_npz(tmp_path / "eval.npz", x=_frames())
    model = save(_reader(_weight()), tmp_path / "reader.onnx")
    confused = save(_confused_reader(), tmp_path / "confused.onnx")
    reference = Reference(model, data, "cpu")
    gate = reference.gate
    assert gate.sequence and gate.checks_sequences and gate.metric is Metric.COSINE
    verdict = reference.verdict(confused)
    assert verdict.value > 0.99 and verdict.worst_cosine is not None and verdict.worst_cosine > 0.95
    assert not verdict.passed  # the cosine rules pass; line 5, whose faint 3 now reads 4, fails it
    assert verdict.failures == ("decoded sequences changed on 1 of 40 samples (2.5%; allowed: <= 0%) FAILED",)


def test_raw_scores_that_no_linear_layer_computes_stay_under_cosine(tmp_path):
    hidden = model_from_text(
        """
        s = MatMul(x, w)
        y0 = Add(s, x2)
        y = Transpose<perm = [1, 0, 2]>(y0)
        """,
        {"w": _weight()[:, :FEATURES]},
        f"float[N, {STEPS}, {FEATURES}] x, float[N, {STEPS}, {FEATURES}] x2", f"float[{STEPS}, N, {FEATURES}] y",
    )
    assert not is_linear_head(hidden, "y")  # a residual sum of two computed tensors is a hidden state
    frames = _frames()
    data = write_npz(tmp_path / "eval.npz", x=frames, x2=np.zeros_like(frames))
    assert not Reference(save(hidden, tmp_path / "hidden.onnx"), data, "cpu").gate.sequence


def test_a_linear_head_is_found_through_reshapes_and_a_constant_bias():
    head = _reader(_weight())
    assert is_linear_head(head, "y")
    boxes = model_from_text("y = Concat<axis = -1>(x, x)", {}, "float[N, 4] x", "float[N, 8] y")
    assert not is_linear_head(boxes, "y")


def test_raw_scores_need_a_dominant_blank_and_some_characters():
    scores = np.einsum("ntf,fc->ntc", _frames(), _weight())
    assert is_class_sequence(scores, linear_head=True)
    assert not is_class_sequence(scores)  # raw values alone do not say "classes"
    noise = np.random.default_rng(0).normal(size=(40, STEPS, CLASSES))
    assert not is_class_sequence(noise, linear_head=True)  # no class tops half the positions
    blank_only = np.einsum("ntf,fc->ntc", np.tile(np.eye(FEATURES)[0], (4, STEPS, 1)), _weight())
    assert not is_class_sequence(blank_only, linear_head=True)  # nothing is ever read: no sequence to judge
    assert not is_class_sequence(scores[:, :1], linear_head=True)  # one position per sample: a classifier


def test_text_labels_reach_a_user_metric_and_never_make_accuracy(tmp_path):
    frames = _frames()
    texts = np.array(["ab", "cd"] * 20)
    data = write_npz(tmp_path / "eval.npz", x=frames, label=texts)
    model = save(_reader(_weight()), tmp_path / "reader.onnx")
    from onnxforge.model_io import input_specs

    samples = load_samples(data, input_specs(_reader(_weight())))
    assert samples.labels is not None and list(samples.labels[:2]) == ["ab", "cd"]
    assert samples.class_ids is None
    assert Reference(model, data, "cpu").gate.metric is Metric.COSINE  # auto: text labels are not classes
    metric = tmp_path / "metric.py"
    metric.write_text("def score(outputs, labels, reference):\n    return float(sum(len(t) for t in labels))\n")
    from onnxforge.pipeline.user_metric import parse_user_metric

    assert Reference(model, data, "cpu", metric=parse_user_metric(f"{metric}:score")).value == 80.0
    with pytest.raises(CalibrationDataError, match="integer class ids or of strings"):
        load_samples(write_npz(tmp_path / "bad.npz", x=frames, label=np.ones((40, 2), np.complex64)),
                     input_specs(_reader(_weight())))


def test_a_failed_decoded_line_fails_the_gate_whose_hint_names_max_churn(tmp_path):
    data = write_npz(tmp_path / "eval.npz", x=_frames())
    reference = Reference(save(_reader(_weight()), tmp_path / "reader.onnx"), data, "cpu")
    verdict = reference.verdict(save(_confused_reader(), tmp_path / "confused.onnx"))
    assert not verdict.passed and any(f.startswith("decoded sequences") for f in verdict.failures)
    assert "--max-churn" in reference.gate.relax_hint()
