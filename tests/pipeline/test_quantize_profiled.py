"""The profiled scheme: only the op types measured faster in int8 on the target are quantized, the rest
stay float with no Q/DQ between float neighbours, and the result says where the time went."""

from __future__ import annotations

import json

import onnx
import onnx.parser
import pytest
from conftest import latency_stats

from onnxforge.errors import UsageError
from onnxforge.pipeline import reference
from onnxforge.pipeline.quantize import QuantizeConfig, parse_scheme, quantize, scheme_id
from onnxforge.pipeline.quantize.op_classes import OpShare, measure_classes
from onnxforge.targets import QuantScope

PROFILED = parse_scheme("qdq-u8s8-per-channel-profiled")


def _timings(fast: set[str]):
    """compare_latency answered per label: the reference (first) at 1 ms, one-class models in ``fast``
    at 0.97 ms (a gain any class over 3% of the time can hold), other one-class models at 1.2 ms, whole
    candidates at 0.5 ms."""

    def timed(sessions, feeds, rounds=20, **_):
        first = next(iter(sessions))
        op_types = {"Conv", "Gemm", "Relu", "Flatten"}
        return {label: latency_stats(1.0 if label == first else 0.5 if label not in op_types
                                     else 0.97 if label in fast else 1.2) for label in sessions}

    return timed


def test_the_scheme_is_spelled_like_the_others():
    assert PROFILED.scope is QuantScope.PROFILED and scheme_id(PROFILED) == "qdq-u8s8-per-channel-profiled"
    with pytest.raises(UsageError, match="two scopes"):
        parse_scheme("qdq-u8s8-per-channel-matmul-profiled")
    with pytest.raises(UsageError, match="does not apply"):
        parse_scheme("dynamic-s8-per-channel-profiled")


def _quantize(tmp_path, classifier_path, calibration_npz):
    config = QuantizeConfig(schemes=(PROFILED,), tolerance=100, mixed_precision=False, latency_rounds=3)
    return quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, config)


def test_only_the_class_measured_faster_is_quantized(tmp_path, classifier_path, calibration_npz, monkeypatch):
    monkeypatch.setattr(reference, "compare_latency", _timings(fast={"Conv"}))
    result = _quantize(tmp_path, classifier_path, calibration_npz)
    report = result.op_classes
    assert report is not None and report.quantized == ["Conv"]
    by_type = {c.op_type: c for c in report.classes}
    assert by_type["Conv"].speedup_alone == pytest.approx(1 / 0.97) and not by_type["Gemm"].quantized
    model = onnx.load(str(tmp_path / "q.onnx"))
    produced_by = {out: n.op_type for n in model.graph.node for out in n.output}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert all(produced_by.get(i) != "DequantizeLinear" for i in gemm.input)  # float reads float, no Q/DQ
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert produced_by.get(conv.input[1]) == "DequantizeLinear"
    # where the time went: fp32's op types and the candidate's, each summing to the whole
    assert report.before and report.after
    assert sum(s.share for s in report.before) == pytest.approx(1.0)
    after = {s.op_type for s in report.after}
    assert "QLinearConv" in after and "Gemm" in after and "Conv" not in after  # the int8 conv, the float Gemm
    saved = json.loads(json.dumps(result.to_json()))["op_classes"]
    assert saved["classes"][0]["op_type"] in ("Conv", "Gemm") and saved["after"]
    assert any("Conv" in note and "int8" in note for note in result.notes)


def test_no_class_faster_is_the_candidates_error(tmp_path, classifier_path, calibration_npz, monkeypatch):
    monkeypatch.setattr(reference, "compare_latency", _timings(fast=set()))
    with pytest.raises(Exception, match="no op type runs faster in int8"):
        _quantize(tmp_path, classifier_path, calibration_npz)


def _timed(name: str, op_type: str, us: float):
    return type("NodeTime", (), {"name": name, "op_type": op_type, "median_us": us})()


def test_classes_split_grouped_convs_and_small_classes_stay_float():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
        a = Conv <kernel_shape = [1, 1]> (x, w1)
        b = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 4> (a, w2)
        c = MatMul (b, m)
        y = Softmax (c)
    }
    """)
    for node, name in zip(model.graph.node, ("dense", "depthwise", "mm", "soft"), strict=True):
        node.name = name

    class Profile:  # onnxruntime's names: a fused dense conv, an NCHWc depthwise one (its output's name)
        nodes = [_timed("dense", "FusedConv", 60.0), _timed("b_nchwc", "Conv", 30.0), _timed("mm", "MatMul", 8.0),
                 _timed("soft", "Softmax", 2.0)]

    built: list[tuple[list[str], list[str]]] = []

    def quantize_only(ops, floats):
        built.append((ops, floats))
        return ops[0]

    speed = {"Conv": 1.5, "Conv grouped": 0.98, "MatMul": 1.2}  # MatMul: 8% of the time cannot give 1.2x
    report = measure_classes("s", Profile(), model, ["Conv", "MatMul", "Softmax"], quantize_only,
                             lambda models: {c: speed[c] for c in models})
    assert (["Conv"], ["depthwise"]) in built and (["Conv"], ["dense"]) in built  # one class of Conv at a time
    assert all(ops != ["Softmax"] for ops, _ in built)  # 2% of the time: never built
    assert report.quantized == ["Conv"]  # the grouped convs lose, MatMul's gain is beyond its share: noise
    matmul = next(c for c in report.classes if c.op_type == "MatMul")
    assert matmul.speedup_alone == pytest.approx(1.2) and matmul.int8_time_ratio is None
    assert "MatMul 8% of fp32 time, alone in int8 1.20x, a gain beyond its share (timing noise): float" in (
        report.describe())
    assert report.selection() == (["Conv"], ["depthwise"])
    dense = next(c for c in report.classes if c.op_type == "Conv")
    assert dense.fp32_share == pytest.approx(0.6) and dense.int8_time_ratio == pytest.approx((1 / 1.5 - 0.4) / 0.6)
    assert report.before[:2] == [OpShare("Conv", 0.6, 60.0), OpShare("Conv grouped", 0.3, 30.0)]
    softmax = next(c for c in report.classes if c.op_type == "Softmax")
    assert softmax.speedup_alone is None and not softmax.quantized


def test_the_cli_says_where_the_time_went(cli, tmp_path, classifier_path, calibration_npz, monkeypatch):
    monkeypatch.setattr(reference, "compare_latency", _timings(fast={"Conv"}))
    report = tmp_path / "q.json"
    code, out, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz,
                         "--scheme", "qdq-u8s8-per-channel-profiled", "--tolerance", "100", "--no-mixed-precision",
                         "--no-cache", "--json", report)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("time by op type"))
    assert "fp32 Conv" in line and "QLinearConv" in line
    assert json.loads(report.read_text())["op_classes"]["classes"]
