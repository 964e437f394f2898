"""``--max-memory``: quantize (and the quantize stage of ``run``) refuses before loading data when
the calibration estimate exceeds the limit: exit 2, one line naming the data file, no output."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_classifier, random_images, save, write_npz  # noqa: E402
from onnxforge.errors import UsageError  # noqa: E402
from onnxforge.pipeline.quantize.calibration_memory import (  # noqa: E402
    BASELINE_BYTES,
    estimate_calibration_memory,
    parse_memory_size,
)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint:")), err
    return lines[0]


@pytest.mark.parametrize(("text", "size"), [("512M", 512 << 20), ("2G", 2 << 30), ("1.5GB", 3 << 29), ("4096", 4096),
                                            ("64kb", 64 << 10)])
def test_parse_memory_size(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2X", "-1G", "0", "", "1.2.3G"])
def test_parse_memory_size_rejects(text):
    with pytest.raises(UsageError):
        parse_memory_size(text)


def test_estimate_counts_activations_per_sample():
    """Conv(3->4) + Relu on 8x8, Flatten 256, Gemm 5: (4*8*8 * 3 + 5) floats per sample."""
    model = make_classifier()
    estimate = estimate_calibration_memory(model, samples_bytes=1000, batch=16)
    assert estimate.activation_bytes_per_sample == (256 * 3 + 5) * 4
    assert estimate.unknown_tensors == 0
    assert estimate.total == BASELINE_BYTES + 1000 + 2 * 16 * (256 * 3 + 5) * 4 + 4 * model.ByteSize()


def test_estimate_says_when_it_is_a_lower_bound():
    model = make_classifier()
    model.graph.value_info.clear()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"  # height unknown: Conv output unknown
    estimate = estimate_calibration_memory(model, samples_bytes=0, batch=1)
    assert estimate.unknown_tensors > 0
    assert "lower bound" in estimate.describe()


def test_quantize_refuses_over_the_limit(cli, tmp_path, classifier_path):
    data = write_npz(tmp_path / "calib.npz", x=random_images(2000))  # 1.5 MB of samples
    output = tmp_path / "int8.onnx"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    code, _, err = cli("quantize", classifier_path, "-o", output, "--calibration", data, "--max-memory", "100M")
    assert code == 2, err
    line = _one_error_line(err)
    assert "calib.npz" in line and "--max-memory" in line and "MiB of samples" in line
    assert not output.exists()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == before


def test_quantize_runs_under_the_limit(cli, tmp_path, classifier_path, calibration_npz):
    output = tmp_path / "int8.onnx"
    code, _, err = cli("quantize", classifier_path, "-o", output, "--calibration", calibration_npz,
                       "--max-memory", "4G", "--tolerance", "100")
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(output)))


def test_data_size_moves_the_verdict(cli, tmp_path, classifier_path):
    """The same limit passes a small file and refuses a large one: the guard reads the data size."""
    small = write_npz(tmp_path / "small.npz", x=random_images(64))
    large = tmp_path / "large.npz"
    np.savez(large, x=np.zeros((40_000, 3, 8, 8), np.float32))  # 29 MiB of samples
    limit = f"{(BASELINE_BYTES >> 20) + 20}M"
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "a.onnx", "--calibration", small,
                       "--max-memory", limit, "--tolerance", "100")
    assert code == 0, err
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "b.onnx", "--calibration", large,
                       "--max-memory", limit)
    assert code == 2, err
    assert "large.npz" in _one_error_line(err)
    assert not (tmp_path / "b.onnx").exists()


def test_bad_max_memory_value(cli, tmp_path, classifier_path, calibration_npz):
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz,
                       "--max-memory", "plenty")
    assert code == 2
    assert "--max-memory" in _one_error_line(err)


def test_run_applies_the_limit_to_its_quantize_stage(cli, tmp_path):
    save(make_classifier(), tmp_path / "classifier.onnx")
    write_npz(tmp_path / "calib.npz", x=random_images(2000))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: classifier.onnx\ncalibration: calib.npz\nstages: [simplify, quantize]\n")
    run_dir = tmp_path / "run"
    code, _, err = cli("run", recipe, "-o", run_dir, "--max-memory", "100M")
    assert code == 2, err
    assert "calib.npz" in _one_error_line(err)
    assert (run_dir / "01_simplify.onnx").exists()  # the stage before quantize completed
    assert not (run_dir / "02_quantize.onnx").exists()
