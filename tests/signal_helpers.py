"""Shared by the signal tests: send SIGTERM to a child pytest and check it ends promptly, by the signal."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest


def terminate_within(process: subprocess.Popen, seconds: float = 20.0) -> None:
    """SIGTERM ``process``; it must end within ``seconds``, killed by the signal (not a test failure)."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pytest was still running {seconds:.0f} s after SIGTERM")
    assert time.monotonic() - sent < seconds
    output = process.stdout.read().decode(errors="replace")[-2000:] if process.stdout else ""
    assert process.returncode == -signal.SIGTERM, output
