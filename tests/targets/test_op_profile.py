"""Per-op profile: parsing onnxruntime's profiler events, the per-node / per-op / per-provider
tables on a real session, and the ``profile --per-op`` / ``--compare`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_classifier, random_images, save

from onnxforge.targets.gpu import CudaTarget
from onnxforge.targets.op_profile import OpProfileConfig, _summarize, parse_profile, profile_ops


def _run(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _kernel(name: str, op: str, ts: int, dur: int, provider: str = "CPUExecutionProvider") -> dict:
    return {
        "cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur,
        "args": {"op_name": op, "provider": provider, "output_type_shape": [{"float": [1, 4]}]},
    }


def _events() -> list[dict]:
    """Three runs: a warm-up (slow), then two measured runs of conv (10/30 µs) and relu (2/2 µs)."""
    return [
        _run(0, 500), _kernel("conv", "Conv", 10, 400), _kernel("relu", "Relu", 420, 50),
        {"cat": "Node", "name": "conv_fence_before", "ts": 1005, "dur": 0, "args": {}},
        _run(1000, 100), _kernel("conv", "Conv", 1010, 10), _kernel("relu", "Relu", 1030, 2),
        _run(2000, 100), _kernel("conv", "Conv", 2010, 30), _kernel("relu", "Relu", 2050, 2, "CUDAExecutionProvider"),
    ]


def test_parse_profile_drops_warmup_and_takes_medians():
    parsed = parse_profile(_events(), skip_runs=1)
    assert parsed.per_node_us == {"conv": 20.0, "relu": 2.0}  # median of (10, 30) and (2, 2): warm-up gone
    assert parsed.run_sums_us == [12.0, 32.0]
    assert parsed.run_durations_us == [100.0, 100.0]
    assert parsed.node_info["conv"] == ("Conv", "CPUExecutionProvider", ((1, 4),))


def test_parse_profile_without_measured_runs_is_an_error():
    from onnxforge.errors import UsageError

    with pytest.raises(UsageError):
        parse_profile(_events(), skip_runs=3)


def test_nodes_outside_the_expected_provider_are_reported_as_fallback():
    events = [
        _run(0, 100), _kernel("matmul", "MatMul", 10, 60, "CUDAExecutionProvider"),
        _kernel("topk", "TopK", 80, 20, "CPUExecutionProvider"),
    ]
    parsed = parse_profile(events)
    result = _summarize(CudaTarget(), parsed, [1e-4], [1e-4], {"x": np.zeros((1, 4))}, OpProfileConfig())
    assert result.expected_provider == "CUDAExecutionProvider"
    assert [n.name for n in result.fallback_nodes] == ["topk"]
    assert {p.provider: p.nodes for p in result.placement} == {"CUDAExecutionProvider": 1, "CPUExecutionProvider": 1}
    assert result.placement[0].share == pytest.approx(60 / 80)
    assert any("topk" in note for note in result.notes)


def test_profile_ops_on_a_real_session(classifier_path):
    feeds = {"x": random_images(1, seed=3)}
    result = profile_ops(classifier_path, feeds, OpProfileConfig(threads=1, warmup=2, runs=12))
    assert result.runs == 12
    assert result.latency.runs == 12 and result.profiled_latency.runs == 12
    # The classifier's Conv and Gemm run (possibly fused with Relu) on the CPU, nothing falls back.
    op_types = {o.op_type for o in result.op_types}
    assert "Gemm" in op_types and op_types & {"Conv", "FusedConv"}
    assert [p.provider for p in result.placement] == ["CPUExecutionProvider"]
    assert result.fallback_nodes == []
    assert sum(n.share for n in result.nodes) == pytest.approx(1.0)
    assert sum(o.nodes for o in result.op_types) == len(result.nodes)
    # Kernels run inside their run() bracket with the sequential executor: they cannot sum to more.
    assert 0 < result.op_sum_ms <= result.ort_run_ms * 1.001
    assert result.coverage > 0 and result.profiler_overhead > 0
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["nodes"][0]["median_us"] >= payload["nodes"][-1]["median_us"]


def test_cli_per_op_and_compare(cli, tmp_path, classifier_path):
    other = save(make_classifier(seed=1), tmp_path / "other.onnx")
    out_json = tmp_path / "profile.json"
    code, stdout, stderr = cli(
        "profile", classifier_path, "--per-op", "--compare", other, "--threads", "1", "--min-seconds", "0.05",
        "--json", out_json,
    )
    assert code == 0, stderr
    assert "per-op sum" in stdout and "EP placement" in stdout and "ratio" in stdout
    payload = json.loads(out_json.read_text())
    per_op = payload["per_op"]
    assert per_op["placement"][0]["provider"] == "CPUExecutionProvider"
    assert per_op["nodes"] and per_op["op_types"]
    comparison = payload["comparison"]
    assert comparison["ratio_other_over_model"] == pytest.approx(
        comparison["other_latency"]["p50_ms"] / comparison["model_latency"]["p50_ms"]
    )
    assert comparison["model_latency"]["runs"] == comparison["other_latency"]["runs"]  # interleaved: same count


def test_cli_compare_missing_file_is_exit_2(cli, tmp_path, classifier_path):
    code, _, stderr = cli("profile", classifier_path, "--compare", tmp_path / "nope.onnx", "--min-seconds", "0.01")
    assert code == 2
    assert "nope.onnx" in stderr


def test_a_control_flow_node_keeps_only_its_own_time():
    """An If's kernel event brackets its body's kernels, which are profiled too: counting both would
    put the per-op sum above the run's own duration (silero-vad: 961%)."""
    events = [
        _run(0, 100), _kernel("if", "If", 10, 80), _kernel("conv", "Conv", 15, 50),
        _kernel("inner_if", "If", 70, 15), _kernel("relu", "Relu", 72, 10), _kernel("out", "Identity", 92, 3),
    ]
    parsed = parse_profile(events)
    assert parsed.per_node_us == {"if": 15.0, "conv": 50.0, "inner_if": 5.0, "relu": 10.0, "out": 3.0}
    assert parsed.run_sums_us == [83.0]  # 80 of the If (body included) + 3, never more than the run's 100
    result = _summarize(CudaTarget(), parsed, [1e-4], [1e-4], {"x": np.zeros((1, 4))}, OpProfileConfig())
    assert result.coverage == pytest.approx(0.83)  # of onnxruntime's own run time in the same runs
