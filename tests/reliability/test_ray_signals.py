"""Starting Ray must not take the process's signal handlers: ``ray.init`` installs its own SIGTERM
handler, which turned ``timeout make test`` into a failure in an unrelated test and a run that went on
for an hour. A library must leave a user's handlers as it found them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
from signal_helpers import terminate_within

REPO = Path(__file__).resolve().parents[2]


def _start_local_ray(reference: Path):
    from onnxforge.pipeline.search.ray_pool import RayPool

    return RayPool("local", types.SimpleNamespace(reference_model=str(reference)))


def test_starting_local_ray_keeps_the_sigterm_and_sigint_handlers(tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "ref.onnx").write_bytes(b"x")

    def mine(signum, frame):
        return None

    before = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    try:
        pool = _start_local_ray(tmp_path / "ref.onnx")
        try:
            assert signal.getsignal(signal.SIGTERM) is mine
            assert signal.getsignal(signal.SIGINT) is before[1]
        finally:
            pool.close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before[0])


SLOW_TESTS = """
import time, types
from pathlib import Path


def test_starts_ray_then_sleeps(tmp_path):
    from onnxforge.pipeline.search.ray_pool import RayPool

    (tmp_path / "ref.onnx").write_bytes(b"x")
    pool = RayPool("local", types.SimpleNamespace(reference_model=str(tmp_path / "ref.onnx")))
    try:
        Path({ready!r}).write_text("ready")
        time.sleep(600)
    finally:
        pool.close()


def test_an_unrelated_slow_test():
    time.sleep(600)
"""


def test_a_pytest_run_that_started_ray_stops_on_sigterm(tmp_path):
    pytest.importorskip("ray")
    ready = tmp_path / "ready"
    test_file = tmp_path / "test_slow_ray.py"
    test_file.write_text(textwrap.dedent(SLOW_TESTS.format(ready=str(ready))))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert process.poll() is None, process.stdout.read().decode(errors="replace")
            assert time.monotonic() < deadline, "Ray did not start within 4 minutes"
            time.sleep(0.5)
        # ended by the signal, as without Ray: not a SystemExit turned into a test failure (then an abort)
        terminate_within(process, 20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        try:  # Ray's own processes, started in the child's session
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
