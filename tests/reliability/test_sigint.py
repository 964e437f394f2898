"""Ctrl-C (SIGINT) or SIGTERM in the middle of calibration: ``onnxforge quantize`` in a real process
exits 130 (143 for SIGTERM) with one line, leaves no output and no temp file (in the output folder
or in $TMPDIR), and the inputs keep their bytes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import without_progress

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def make_slow_cnn(channels: int = 64, size: int = 48) -> onnx.ModelProto:
    """Two 3x3 Convs of ``channels`` on size x size images: ~85 MMAC per sample, so calibrating
    800 samples takes seconds on two cores, long enough to be interrupted in the middle."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    slow (float[N,3,{size},{size}] x) => (float[N,5] logits) {{
        a = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w1, b1)
        a2 = Relu (a)
        b = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (a2, w2, b2)
        b_act = Relu (b)
        p = GlobalAveragePool (b_act)
        f = Flatten <axis = 1> (p)
        logits = Gemm <transB = 1> (f, fc_w, fc_b)
    }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    shapes = {"w1": (channels, 3, 3, 3), "b1": (channels,), "w2": (channels, channels, 3, 3), "b2": (channels,),
              "fc_w": (5, channels), "fc_b": (5,)}
    for name, shape in shapes.items():
        model.graph.initializer.append(
            onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for_calibration(process: subprocess.Popen, tmpdir: Path, timeout: float = 180.0) -> bool:
    """True once the calibrator's private folder (onnxruntime's augmented model inside it) exists;
    False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        # temp folders live in the process's own onnxforge-<pid>-* folder (see onnxforge/_scratch.py)
        if any((d / "augmented.onnx").exists() for d in tmpdir.glob("**/onnxforge-calib-*")):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("signum, exit_code, word", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "terminated"),
])
def test_signal_during_calibration(tmp_path, signum, exit_code, word):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model = inputs / "slow.onnx"
    model.write_bytes(make_slow_cnn().SerializeToString())
    data = inputs / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((800, 3, 48, 48)).astype(np.float32))
    digests = {p: _digest(p) for p in (model, data)}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "slow_int8.onnx"
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(private_tmp), "OMP_NUM_THREADS": "1"}

    process = subprocess.Popen(
        [sys.executable, "-m", "onnxforge", "quantize", str(model), "-o", str(output), "--calibration", str(data),
         "--max-samples", "1024", "--tolerance", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        calibrating = _wait_for_calibration(process, private_tmp)
        if calibrating:
            time.sleep(0.3)  # well inside the batch loop
            assert process.poll() is None, "calibration ended before the signal could be sent"
            process.send_signal(signum)
        _stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert calibrating, f"never saw calibration start; exit {process.returncode}:\n{stderr}"

    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in without_progress(stderr).splitlines() if line.strip()]  # what ran, then one line
    assert len(lines) == 1 and word in lines[0], stderr
    assert not output.exists()
    assert list(out_dir.iterdir()) == [], f"left in the output folder: {list(out_dir.iterdir())}"
    # temp folders (ours: onnxforge-quant-*, onnxforge-calib-*; onnxruntime's pre.quant.*) are gone;
    # a library at import time leaves a small dotfile there even on `inspect`, which is not ours
    leaked = [p.name for p in private_tmp.iterdir() if p.is_dir() or p.name.startswith("onnxforge")]
    assert not leaked, f"left in TMPDIR: {leaked}"
    assert sorted(inputs.iterdir()) == sorted(digests)
    assert {p: _digest(p) for p in digests} == digests
