"""Progress as a CI log sees it: a real command with stderr piped prints timestamped phase lines with
i/N there while ``--json -`` keeps stdout parseable; a command that fails fast on bad input still prints
one error line (the start delay holds progress back)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import random_images, write_npz
from test_errors import assert_one_error_line

from onnxforge.cli.progress_view import DELAY_ENV

_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] quantize: ")


def test_a_piped_quantize_prints_timestamped_phases_with_counts_and_stdout_stays_json(
        tmp_path, classifier_path, calibration_npz):
    out = tmp_path / "int8.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge", "quantize", str(classifier_path), "-o", str(out), "--calibration",
         str(calibration_npz), "--objective", "size", "--json", "-", "--no-cache"],
        capture_output=True, text=True, timeout=300, env={**os.environ, DELAY_ENV: "0"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["chosen"]  # nothing but the JSON on stdout
    lines = result.stderr.splitlines()
    assert lines and all(_LINE.match(line) for line in lines), result.stderr
    text = "\n".join(lines)
    assert re.search(r"quantize: calibrating \(minmax\) \d+/\d+", text), text
    assert re.search(r"quantize: quantizing and scoring candidates \d+/\d+", text), text
    assert re.search(r"quantize: timing fp32 and \d+ candidate\(s\) interleaved \d+/\d+", text), text


def test_bad_data_found_inside_the_stage_is_one_line_unless_progress_starts_at_once(
        cli, tmp_path, classifier_path, monkeypatch):
    wrong = write_npz(tmp_path / "wrong.npz", y=random_images(8))  # no array named after the input
    monkeypatch.setenv(DELAY_ENV, "30")  # the default is 2 s; a loaded test machine may take longer to fail
    code, stdout, err = cli("quantize", classifier_path, "-o", tmp_path / "a.onnx", "--calibration", wrong,
                            "--no-cache")
    assert code == 2 and stdout == ""
    assert_one_error_line(err, "no array for model input 'x'")
    assert err.startswith("error:"), err  # and no progress line before it

    monkeypatch.setenv(DELAY_ENV, "0")  # the same failure with no delay: the stage's first phases show
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "b.onnx", "--calibration", wrong, "--no-cache")
    assert code == 2
    assert re.search(r"^\[\d\d:\d\d:\d\d\] quantize: reading the calibration data$", err, re.MULTILINE), err
    assert err.splitlines()[-2].startswith("error:")


def test_profile_and_compare_report_their_steps_when_piped(cli, tmp_path, classifier_path, calibration_npz,
                                                           monkeypatch):
    monkeypatch.setenv(DELAY_ENV, "0")
    code, _, err = cli("profile", classifier_path, "--batch", "1", "--batch", "2", "--min-seconds", "0")
    assert code == 0, err
    first = r"^\[\d\d:\d\d:\d\d\] latency per batch and thread count 0/2 \(batch 1, threads default\)"
    assert re.search(first, err, re.MULTILINE), err
    code, _, err = cli("compare", classifier_path, classifier_path, "--data", calibration_npz, "--max-samples", "3")
    assert code == 0, err
    assert re.search(r"^\[\d\d:\d\d:\d\d\] running both models sample by sample 0/3", err, re.MULTILINE), err
