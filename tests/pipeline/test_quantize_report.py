"""What quantize tells a person: the candidate table and --json on every exit, exit 4 included, and a
slower model called slower (a 0.84x speedup was printed as "0.84x faster")."""

from __future__ import annotations

import json
from pathlib import Path

from onnxforge.cli.console import speed_words as _speed_words
from onnxforge.cli.render import render_stage


def _render_quantize(payload: dict, name: str, target: str) -> None:
    render_stage("quantize", payload, Path(name), failed=False)


def test_exit_4_still_shows_the_candidates_and_writes_json(tmp_path, cli, classifier_path, calibration_npz, eval_npz):
    report = tmp_path / "q.json"
    code, out, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz,
                         "--eval", eval_npz, "--metric", "cosine", "--tolerance", "0.999999", "--no-mixed-precision",
                         "--scheme", "qdq-u8s8-per-tensor", "--scheme", "qdq-s8s8-per-tensor", "--json", report)
    assert code == 4, err
    assert "QDQ U8S8 per-tensor" in out and "QDQ S8S8 per-tensor" in out and "over tolerance" in out
    assert "kept: the most accurate" in out
    data = json.loads(report.read_text())
    assert [c["scheme"] for c in data["candidates"]] == ["QDQ U8S8 per-tensor", "QDQ S8S8 per-tensor"]
    assert not any(c["meets_tolerance"] for c in data["candidates"]) and data["chosen"]


def _payload(speedup: float) -> dict:
    latency = {"p50_ms": 1.0}
    candidate = {"scheme": "QDQ U8S8 per-channel", "score": 0.999, "meets_tolerance": True, "latency": latency,
                 "speedup_vs_fp32": speedup, "bytes": 1000, "error": None, "float_nodes": []}
    return {"path": "q.onnx", "metric": "cosine", "gate": "mean cosine to fp32 >= 0.99", "fp32_score": 1.0,
            "fp32_latency": latency, "candidates": [candidate], "chosen": candidate["scheme"], "notes": [],
            "layer_errors": [], "top_offenders": []}


def test_a_slower_model_is_called_slower(capsys):
    _render_quantize(_payload(0.84), "m.onnx", "cpu")
    out = capsys.readouterr().out
    assert "1.19x SLOWER than fp32" in out and "0.84x faster" not in out and "(slower)" in out
    _render_quantize(_payload(1.7), "m.onnx", "cpu")
    assert "1.70x faster than fp32" in capsys.readouterr().out
    assert "SLOWER" in _speed_words(0.5) and _speed_words(None) == "speed not measured"
