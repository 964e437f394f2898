"""Per-channel schemes on models older than opset 13, one-line errors cut at a word, and hints that
name the op that failed."""

from __future__ import annotations

import onnx
import pytest
from conftest import make_classifier, save

from onnxforge.errors import UsageError, first_line
from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize
from onnxforge.pipeline.quantize.opset import failing_op

# The tiny test models are overhead-bound (int8 measures ~0.73x fp32), so quantize would keep the input
# and exit 4 (issue 23); these tests are about other things, so int8 is timed 2x faster (conftest.int8_faster).
pytestmark = pytest.mark.usefixtures("int8_faster")

PER_CHANNEL = parse_scheme("qdq-u8s8-per-channel")
PER_TENSOR = parse_scheme("qdq-u8s8-per-tensor")


def _config(**kwargs) -> QuantizeConfig:
    return QuantizeConfig(tolerance=100, mixed_precision=False, error_report=False, latency_rounds=2, **kwargs)


def test_an_opset_11_model_is_upgraded_for_per_channel_and_checked(tmp_path, calibration_npz):
    # before: "InvalidModelError: ...candidate_1.onnx: ... Load model from /tmp/onnxforge-6813-mlelr2" (cut)
    model_path = save(make_classifier(opset=11), tmp_path / "old.onnx")
    result = quantize(model_path, tmp_path / "q.onnx", calibration_npz, _config(schemes=(PER_CHANNEL, PER_TENSOR)))
    assert all(c.error is None and c.score is not None for c in result.candidates), result.candidates
    assert any("opset 11 upgraded to 13" in n and "same outputs on the data" in n for n in result.notes)
    assert (
        next(o.version for o in onnx.load(str(tmp_path / "q.onnx")).opset_import if o.domain in ("", "ai.onnx")) >= 13
    )


def test_a_model_that_cannot_be_upgraded_drops_per_channel_with_a_note(tmp_path, calibration_npz, monkeypatch):
    def refuse(model, version):
        raise RuntimeError("No adapter for op FancyOp")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    model_path = save(make_classifier(opset=11), tmp_path / "old.onnx")
    result = quantize(model_path, tmp_path / "q.onnx", calibration_npz, _config(schemes=(PER_CHANNEL, PER_TENSOR)))
    assert [c.scheme for c in result.candidates] == [PER_TENSOR.label]
    assert any("needs opset 13" in n and "No adapter for op FancyOp" in n and "not measured" in n for n in result.notes)
    with pytest.raises(UsageError, match="needs opset 13") as info:
        quantize(model_path, tmp_path / "q2.onnx", calibration_npz, _config(schemes=(PER_CHANNEL,)))
    assert "per-tensor" in info.value.hint


def test_error_lines_are_cut_at_a_word_and_lose_temp_paths():
    message = (
        "[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model from /tmp/onnxforge-6813-mlelr2xo/onnxforge-quant-"
        'j6who9o0/candidate_1.onnx failed:This is an invalid model. In Node, ("bias_DequantizeLinear", '
        'DequantizeLinear, "", -1) : Error Unrecognized attribute: axis for operator DequantizeLinear'
    )
    line = first_line(message, 120)
    assert "/tmp/onnxforge" not in line and line.endswith(" …") and len(line) <= 120
    whole = first_line(message, 10_000)
    kept = line[: -len(" …")]
    assert whole.startswith(kept) and whole[len(kept)] in " ,:;"  # cut between words, never inside one
    assert first_line(message, 1000).endswith("for operator DequantizeLinear")
    assert failing_op(message) == "DequantizeLinear"
    assert (
        failing_op("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Op (Resize) node")
        == "Resize"
    )
    assert failing_op("shape mismatch") is None


def test_an_already_quantized_model_is_refused_with_a_reason(tmp_path, classifier_path, calibration_npz, cli):
    # before: "internal error: KeyError: '140_scale' ... Graph is not a DAG"
    quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, _config(schemes=(PER_TENSOR,)))
    code, _, err = cli("quantize", tmp_path / "q.onnx", "-o", tmp_path / "qq.onnx", "--calibration", calibration_npz)
    assert code == 2 and "already quantized" in err and "QuantizeLinear" in err
