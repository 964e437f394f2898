"""A SIGTERM while a command runs inside another process (the CLI called in-process, as the tests and a
user's script do) unwinds the command and then stops that process too: ``timeout make test`` hit while a
test runs ``onnxforge.cli.main`` must end the suite, not fail that one test and carry on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from signal_helpers import terminate_within

REPO = Path(__file__).resolve().parents[2]

SLOW_TESTS = """
from pathlib import Path

from onnxforge.cli import main


def test_a_long_command_in_process(tmp_path):
    source = tmp_path / "slow.py"  # an export whose model takes ten minutes to build
    source.write_text("import time\\n\\ndef build():\\n    time.sleep(600)\\n")
    Path({ready!r}).write_text("ready")
    assert main(["export", f"{{source}}:build", "-o", str(tmp_path / "m.onnx")]) == 0


def test_an_unrelated_test_after_it():
    Path({after!r}).write_text("ran")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_an_in_process_command_stops_the_caller(tmp_path):
    ready, after = tmp_path / "ready", tmp_path / "after"
    test_file = tmp_path / "test_slow_command.py"
    test_file.write_text(textwrap.dedent(SLOW_TESTS.format(ready=str(ready), after=str(after))))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, process.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the command did not start within 2 minutes"
            time.sleep(0.2)
        time.sleep(3.0)  # the export's child process is building the model
        terminate_within(process, 20)
        assert not after.exists(), "the suite went on to the next test after SIGTERM"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
