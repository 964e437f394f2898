"""Shared pieces for benchmark cases: the demo model and data, JSON output, markdown tables."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge._atomic import atomic_write_text
from onnxforge.pipeline.manifest import machine_description, tool_versions

RESULTS = Path(__file__).with_name("results")


def demo_model(folder: Path) -> tuple[Path, Path, Path]:
    """Export the built-in digits CNN (dynamic batch) and write calibration/eval .npz files."""
    from onnxforge.converters import ExportConfig, export
    from onnxforge.datasets import load_digits_split

    split = load_digits_split()
    model = folder / "digits_fp32.onnx"
    export("builtin:digits_cnn", model, ExportConfig(dynamic_batch=True))
    calib = folder / "calibration.npz"
    evaluation = folder / "eval.npz"
    np.savez(calib, image=split.train_images[:256])
    np.savez(evaluation, image=split.test_images, label=split.test_labels)
    return model, calib, evaluation


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(case: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{case}.json"
    body = {"case": case, "machine": machine_description(), "tool_versions": tool_versions(), **payload}
    atomic_write_text(path, json.dumps(body, indent=2, default=str) + "\n")
    return path


def peak_rss_mb(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh Python process; returns (its peak RSS in MB, its stdout)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child would report its parent's peak.
    wrapper = code + (
        "\nfor _line in open('/proc/self/status'):\n"
        "    if _line.startswith('VmHWM:'):\n"
        "        print('PEAK_RSS_KB', _line.split()[1])\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(wrapper)
    done = subprocess.run([sys.executable, f.name], capture_output=True, text=True, check=True)
    Path(f.name).unlink()
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return peak / 1024.0, done.stdout
