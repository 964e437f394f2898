"""A ``file.py:callable`` source is the user's code, and runs in a child process: its ``sys.exit(0)``,
``os._exit(0)``, ``raise SystemExit(3)`` or a hang end in one ``error:`` line saying how it ended
(exit 2), a non-daemon thread it leaves behind does not keep onnxforge alive, and what it prints
goes to stderr, so ``--json -`` stays clean. No output and no temp file is left; the source is
unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import without_progress
from test_bad_inputs import one_error_line, run_cli, untouched  # noqa: F401

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

SOURCE = textwrap.dedent(
    """
    import os
    import sys
    import threading
    import time

    import torch
    from torch import nn


    def model():
        torch.manual_seed(0)
        return nn.Linear(4, 3).eval()


    def exits_0():
        sys.exit(0)


    def hard_exit_0():
        os._exit(0)


    def raises_system_exit_3():
        raise SystemExit(3)


    def hangs():
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)


    def leaves_a_thread():
        threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon: would block exit
        return model()


    def prints():
        print("hello from the model source")
        return model()
    """
)


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    path = folder / "model.py"
    path.write_text(SOURCE)
    return path


def _export(run_cli, source: Path, callable_name: str, output: Path, *extra) -> tuple[int, str]:
    return run_cli("export", f"{source}:{callable_name}", "-o", output, "--input-shape", "input=2x4", *extra)


@pytest.mark.parametrize("callable_name, code", [("exits_0", 0), ("hard_exit_0", 0), ("raises_system_exit_3", 3)])
def test_model_source_that_ends_the_process(run_cli, source, tmp_path, callable_name, code):
    output = tmp_path / "out" / "model.onnx"
    with untouched(tmp_path):
        status, err = _export(run_cli, source, callable_name, output)
    assert status == 2, err
    one_error_line(err, f"model.py:{callable_name}", f"exited with code {code}")
    assert not output.exists()


def test_model_source_that_hangs_is_stopped_at_the_timeout(run_cli, source, tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    output = tmp_path / "out" / "model.onnx"
    start = time.monotonic()
    status, err = _export(run_cli, source, "hangs", output, "--timeout", "8")
    assert status == 2, err
    assert time.monotonic() - start < 60
    one_error_line(err, "did not finish within 8 s")
    assert not output.exists() and list(output.parent.iterdir()) == []
    if pid_file.exists():  # the child got as far as the user code: it must be gone now
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_non_daemon_thread_does_not_keep_onnxforge_alive(run_cli, source, tmp_path):
    output = tmp_path / "model.onnx"
    start = time.monotonic()
    status, err = _export(run_cli, source, "leaves_a_thread", output)
    assert status == 0, err
    assert output.is_file()
    assert time.monotonic() - start < 300


def test_model_source_prints_go_to_stderr(source, tmp_path, capfd):
    from onnxforge.cli import main

    output = tmp_path / "model.onnx"
    status = main(["export", f"{source}:prints", "-o", str(output), "--input-shape", "input=2x4", "--json", "-"])
    captured = capfd.readouterr()
    assert status == 0, captured.err
    assert json.loads(captured.out)["path"] == str(output)  # stdout is nothing but the JSON
    assert "hello from the model source" in captured.err


def test_a_recipe_records_a_model_source_that_exits(run_cli, source, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {source}:exits_0\ninput_shapes: {{input: [2, 4]}}\nstages: [export]\n")
    run_dir = tmp_path / "run"
    status, err = run_cli("run", recipe, "-o", run_dir)
    assert status == 2, err
    one_error_line(err, "exited with code 0")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(s["name"], s["status"]) for s in manifest["stages"]] == [("export", "failed")]
    assert "exited with code 0" in manifest["stages"][0]["error"]


def test_sigterm_while_the_model_source_runs(source, tmp_path):
    """SIGTERM to onnxforge stops the child as well: exit 143, one line, no process or file left."""
    pid_file = tmp_path / "pid"
    output = tmp_path / "out" / "model.onnx"
    env = {**os.environ, "PID_FILE": str(pid_file), "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onnxforge",
            "export",
            f"{source}:hangs",
            "-o",
            str(output),
            "--input-shape",
            "input=2x4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_file.exists(), "the model source never started"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stderr
    lines = [line for line in without_progress(stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "terminated" in lines[0], stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert list(output.parent.iterdir()) == []
    # no temp folder left in TMPDIR (a library leaves a small dotfile there at import, which is not ours)
    leaked = [p.name for p in tmp_path.iterdir() if p.name not in ("out", "pid", "src") and p.is_dir()]
    assert not leaked, leaked
