"""Temp folders of killed runs: every temp folder a command makes lives inside its own
``$TMPDIR/onnxforge-<pid>-*`` folder; a run killed with SIGKILL leaves that folder behind, and the
next onnxforge start removes it — but never the folder of a process that is still running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_classifier
from test_sigint import _wait_for_calibration, make_slow_cnn

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
fcntl = pytest.importorskip("fcntl")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_next_start_removes_only_dead_owners_folders(tmp_path, monkeypatch, capsys):
    from onnxforge.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tmp_path / "model.onnx"
    model.write_bytes(make_classifier().SerializeToString())
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_folder = tmp_path / f"onnxforge-{_dead_pid()}-abcd1234"
        live_folder = tmp_path / f"onnxforge-{alive.pid}-abcd1234"
        not_ours = tmp_path / "onnxforge-quant-abcd1234"  # no owner recorded: never guessed at
        # the pid is unknown here (a process in another pid namespace), but the owner's lock is held
        locked_folder = tmp_path / f"onnxforge-{_dead_pid()}-lockedxx"
        for folder in (dead_folder, live_folder, not_ours, locked_folder):
            (folder / "sub").mkdir(parents=True)
            (folder / "sub" / "augmented.onnx").write_bytes(b"x")
        lock = os.open(locked_folder / ".owner.lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert main(["inspect", str(model)]) == 0
        os.close(lock)
    finally:
        alive.kill()
        alive.wait()
    assert not dead_folder.exists()
    assert live_folder.exists() and not_ours.exists() and locked_folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.onnx", live_folder.name, not_ours.name, locked_folder.name])


def test_folder_of_a_killed_run_is_removed_at_the_next_start(tmp_path):
    model = tmp_path / "slow.onnx"
    model.write_bytes(make_slow_cnn().SerializeToString())
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((800, 3, 48, 48)).astype(np.float32))
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(private_tmp), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "onnxforge", "quantize", str(model), "-o", str(tmp_path / "int8.onnx"),
         "--calibration", str(data), "--max-samples", "1024", "--tolerance", "100"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        calibrating = _wait_for_calibration(process, private_tmp)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert calibrating, "never saw calibration start"
    left = [p.name for p in private_tmp.iterdir() if p.is_dir()]
    assert left == [next(n for n in left if n.startswith(f"onnxforge-{process.pid}-"))], left

    after = subprocess.run([sys.executable, "-m", "onnxforge", "inspect", str(model)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert after.returncode == 0, after.stderr
    assert [p.name for p in private_tmp.iterdir() if p.is_dir()] == []


def test_pre_processing_leaves_nothing_in_the_working_folder(cli, tmp_path, monkeypatch, int8_faster):
    """onnxruntime's symbolic shape inference saves ``sym_shape_infer_temp.onnx`` into the current folder
    when it fails (here: two inputs' symbolic dims that only auto-merge reconciles); quantize's
    pre-processing runs it inside its temp folder, so the user's folder gets the output only."""
    import onnx.parser

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,A] x, float[N,B] y) => (float[N,C] z) {
            s = Add (x, y)
            w = Mul (s, s)
            z = Relu (w)
        }
    """)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((20, 4)).astype(np.float32),
             y=rng.standard_normal((20, 4)).astype(np.float32))
    monkeypatch.chdir(work)
    code, _, err = cli("quantize", tmp_path / "m.onnx", "-o", "q.onnx", "--calibration", tmp_path / "calib.npz",
                       "--tolerance", "100", "--json", tmp_path / "q.json")
    assert code == 0, err
    notes = json.loads((tmp_path / "q.json").read_text())["notes"]
    assert any("symbolic shape inference failed" in n for n in notes), notes  # the path that writes the file ran
    assert sorted(p.name for p in work.iterdir()) == ["q.onnx"]
