"""Headless Chromium for the report tests: found (or installed with apt-get when root), run with a
throw-away profile; tests that need it skip cleanly when there is none."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _find_or_install_chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    try:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError):
        return None
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _find_or_install_chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed and 'apt-get install -y chromium' failed here")
    return path


def run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile_dir:
        return subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *args],
            capture_output=True, text=True, timeout=120,
        )
