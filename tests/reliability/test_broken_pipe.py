"""``onnxforge inspect m.onnx | head -n 1``: when the reader of our stdout goes away, the command
stops quietly — no traceback, no 'internal error', no 'Exception ignored' at exit — with 141, the
status a shell reports for a process that SIGPIPE ended."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_classifier

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")


@pytest.mark.parametrize("extra", [[], ["--json", "-"]], ids=["table", "json"])
def test_reader_gone_is_a_quiet_exit(tmp_path, extra):
    model = tmp_path / "model.onnx"
    model.write_bytes(make_classifier().SerializeToString())
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write fails with EPIPE
    try:
        process = subprocess.run([sys.executable, "-m", "onnxforge", "inspect", str(model), *extra],
                                 stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert process.stderr == ""
    assert process.returncode == 141
