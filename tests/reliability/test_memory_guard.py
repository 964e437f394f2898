"""``--max-memory``: quantize (and the quantize stage of ``run``) refuses before loading data when
the calibration estimate exceeds the limit: exit 2, one line naming the data file, no output."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_classifier, random_images, save, without_progress, write_npz

from onnxforge.errors import UsageError
from onnxforge.pipeline.quantize.calibration_memory import (
    BASELINE_BYTES,
    estimate_calibration_memory,
    parse_memory_size,
)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in without_progress(err).splitlines() if line.strip()]  # a slow refusal shows progress
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


def test_quantize_runs_under_the_limit(cli, tmp_path, classifier_path, calibration_npz, int8_faster):
    output = tmp_path / "int8.onnx"
    code, _, err = cli("quantize", classifier_path, "-o", output, "--calibration", calibration_npz,
                       "--max-memory", "4G", "--tolerance", "100")
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(output)))


def _resident() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))


def test_data_size_moves_the_verdict(cli, tmp_path, classifier_path, int8_faster):
    """The same limit passes a small file and refuses a large one: the guard reads the size of the data
    it will read (the file's header, as far as --max-samples; rows past it are never read)."""
    small = write_npz(tmp_path / "small.npz", x=random_images(64))
    # the limit is kept for real: it must leave room beside what this (test) process already holds
    limit_mib = (max(_resident(), BASELINE_BYTES) >> 20) + 300
    # larger than the limit by its header, whatever this process holds: a sparse .npy of zeros
    row_bytes = 3 * 8 * 8 * 4
    rows = ((limit_mib + 200) << 20) // row_bytes
    large = tmp_path / "large.npy"
    with open(large, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, 3, 8, 8)})
        f.truncate(f.tell() + rows * row_bytes)
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "a.onnx", "--calibration", small,
                       "--max-memory", f"{limit_mib}M", "--tolerance", "100")
    assert code == 0, err
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "b.onnx", "--calibration", large,
                       "--max-memory", f"{limit_mib}M", "--max-samples", str(rows))
    assert code == 2, err
    assert "large.npy" in _one_error_line(err)
    assert not (tmp_path / "b.onnx").exists()
    # the same file read 256 samples deep (the default) fits: the rows past them are never read
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "c.onnx", "--calibration", large,
                       "--max-memory", f"{limit_mib}M", "--tolerance", "100")
    assert code in (0, 4), err


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


# ------------------------------------------------------------------------------------------------
# --max-memory is kept, not only estimated: batches and tensor passes sized from the data's real shapes


def _detector(channels: int = 16) -> onnx.ModelProto:
    """A fully convolutional detector with a dynamic H, W (like PP-OCR's): stride-2 stem, a residual
    block, x2 upsampling, a one-channel probability map."""
    import onnx.parser

    rng = np.random.default_rng(0)

    def conv(co, ci, k=3):
        return (rng.standard_normal((co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32)

    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        det (float[N,3,H,W] x) => (float[N,1,H,W] y) {
            a = Conv <pads = [1, 1, 1, 1], strides = [2, 2], kernel_shape = [3, 3]> (x, w1, b)
            ar = Relu (a)
            c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (ar, w2, b)
            cr = Relu (c)
            s = Add (cr, ar)
            u = Resize <mode = "nearest"> (s, , scales)
            d = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (u, w3, b)
            dr = Relu (d)
            e = Conv <kernel_shape = [1, 1]> (dr, w4, b4)
            y = Sigmoid (e)
        }
        """
    )
    weights = {"w1": conv(channels, 3), "w2": conv(channels, channels), "w3": conv(channels, channels),
               "w4": conv(1, channels, 1), "b": np.zeros(channels, np.float32), "b4": np.zeros(1, np.float32),
               "scales": np.array([1, 1, 2, 2], np.float32)}
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def test_the_estimate_uses_the_data_shapes_not_the_declared_ones():
    from onnxforge.pipeline.quantize.memory_plan import activation_profile

    model = _detector()
    declared = estimate_calibration_memory(model, samples_bytes=0, batch=1)
    assert declared.unknown_tensors > 0  # the old estimate: a lower bound that missed every activation
    profile = activation_profile(model, {"x": (1, 3, 480, 640)})
    assert profile.unknown == 0
    half, full = 16 * 240 * 320 * 4, 16 * 480 * 640 * 4  # bytes of one stride-2 map and one full-size map
    assert profile.per_sample == 5 * half + 3 * full + 2 * 480 * 640 * 4
    assert full < profile.live < profile.per_sample


@pytest.mark.parametrize("method", ["MinMax", "Entropy"])
@pytest.mark.parametrize("passes", [3, 50])  # 50: more passes than tensors, some with nothing to calibrate
def test_calibration_in_tensor_passes_gives_the_same_ranges(tmp_path, classifier_path, method, passes):
    from onnxruntime.quantization import CalibrationMethod

    from onnxforge.pipeline.quantize.calibration_ranges import collect_ranges

    images = random_images(32, seed=4)

    def batches():
        return ({"x": images[i : i + 8]} for i in range(0, 32, 8))

    one, several = tmp_path / "one.json", tmp_path / "several.json"
    collect_ranges(classifier_path, batches, CalibrationMethod[method], one)
    sizes = {"x": 3 * 8 * 8 * 4}  # one known size; the others count as its average
    collect_ranges(classifier_path, batches, CalibrationMethod[method], several, tensor_groups=passes,
                   tensor_sizes=sizes, low_memory=True)
    ranges = [json.loads(p.read_text())["data"] for p in (one, several)]
    assert len(ranges[0]) >= 3
    assert ranges[0] == ranges[1]  # every tensor's range, to the bit


def test_tensor_shares_are_balanced_by_size():
    from onnxforge.pipeline.quantize.memory_plan import balanced_shares

    sizes = {"a": 90, "b": 80, "c": 70, "d": 60, "e": 50, "f": 40}
    shares = balanced_shares(sizes, 3, sizes)
    assert sorted(sum(sizes[n] for n in share) for share in shares) == [130, 130, 130]
    assert set().union(*shares) == set(sizes) and sum(map(len, shares)) == len(sizes)


@pytest.mark.parametrize("histogram", [False, True])
def test_every_phase_s_batch_and_passes_fit_what_is_left(monkeypatch, histogram):
    """For limits from too small to plenty: each phase's choice costs (by the plan's own model of it) no more
    than what is left; what cannot fit raises (calibration) or returns None (analysis)."""
    from onnxforge.errors import CalibrationDataError
    from onnxforge.pipeline.quantize import memory_plan as mp

    mib = 1 << 20
    profile = mp.ActivationProfile(per_sample=100 * mib, live=10 * mib, unknown=0, largest=20 * mib)
    monkeypatch.setattr(mp, "resident_memory", lambda: 500 * mib)
    chosen = set()
    for limit in range(600 * mib, 8000 * mib, 25 * mib):
        plan = mp.MemoryPlan(limit, True, profile, wanted=16, fixed_batch=None, model_bytes=mib)
        left = limit - 500 * mib - mp._MARGIN
        forward = plan.forward
        size = plan.analysis_size()
        if size is not None:
            batch, passes = size
            per_sample = forward + (
                3 * profile.per_sample if passes == 1 else 4 * (profile.per_sample / passes + 20 * mib)
            )
            assert batch * per_sample + 6 * mib <= left, (limit, size)
            chosen.add(("analysis", passes > 1))
        else:
            assert forward + 4 * (profile.per_sample / mp._MAX_NODE_PASSES + 20 * mib) + 6 * mib > left
        try:
            batch, groups = plan.calibration_batch("data.npz", histogram=histogram)
        except CalibrationDataError:
            assert forward + (3 if histogram else 1) * 20 * mib + 3 * mib > left
            continue
        factor = 3 if histogram else 1
        assert batch * (forward + factor * (profile.per_sample / groups + 20 * mib)) + 3 * mib <= left, (limit, batch)
        chosen.add(("calibration", groups > 1))
    assert chosen >= {("analysis", True), ("analysis", False), ("calibration", True), ("calibration", False)}


def test_a_forward_pass_that_cannot_fit_is_refused_before_any_work(cli, tmp_path):
    model_path = save(_detector(), tmp_path / "det.onnx")
    data = write_npz(tmp_path / "det.npz", x=np.zeros((4, 3, 480, 640), np.float32))
    limit = f"{(BASELINE_BYTES >> 20) + 40}M"
    code, _, err = cli("quantize", model_path, "-o", tmp_path / "q.onnx", "--calibration", data, "--max-memory", limit)
    assert code == 2, err
    line = _one_error_line(err)
    assert "det.npz" in line and "forward pass at batch 1" in line and "--max-memory" in line
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("limit", ["--max-memory 2G", "default"])
def test_max_memory_is_kept_quantizing_a_detector_sized_input(tmp_path, limit):
    """Peak resident memory (VmHWM) of a child quantizing 3x480x640 inputs with a 16-channel detector,
    under --max-memory 2G, and without it on a machine with 2.5 GiB available (the default: 80%).

    Before: batch 16 for calibration and for the per-node error analysis, 5.6 GiB under --max-memory 2G."""
    import os
    import subprocess
    import textwrap

    model_path = save(_detector(), tmp_path / "det.onnx")
    rng = np.random.default_rng(1)
    data = write_npz(tmp_path / "det.npz", x=rng.standard_normal((16, 3, 480, 640)).astype(np.float32))
    args = ["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--calibration", str(data),
            "--scheme", "qdq-u8s8-per-channel", "--tolerance", "0.9", "--json", str(tmp_path / "q.json")]
    if limit == "default":
        fake = "import onnxforge.pipeline.quantize.calibrate as c; c.available_memory = lambda: 5 << 29\n"
    else:
        fake, args = "", [*args, *limit.split()]
    script = fake + textwrap.dedent(f"""
        from onnxforge.cli import main
        code = main({args!r})
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print("exit", code, "peak_kib", peak)
    """)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    work = tmp_path / "work"  # the child's working folder: it must stay empty
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=work,
                          env=env, check=False)
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["exit", "0"], done.stdout + done.stderr
    peak = int(last[3]) * 1024
    assert peak < 2 << 30, f"peak {peak / 2**30:.2f} GiB"
    notes = json.loads((tmp_path / "q.json").read_text())["notes"]
    within = "--max-memory 2.00 GiB" if limit != "default" else "2.00 GiB (80% of the memory available at the start)"
    assert any(n.startswith(f"memory plan within {within}") for n in notes), notes
    assert list(work.iterdir()) == []


def test_without_max_memory_the_limit_is_a_share_of_the_available_memory(
    cli, tmp_path, classifier_path, monkeypatch, int8_faster
):
    """No --max-memory: the run is held to 80% of the memory available at the start, and refused before
    any work when that cannot hold Python, the samples and a forward pass (the OOM killer is the alternative)."""
    from onnxforge.pipeline.quantize import calibrate

    data = write_npz(tmp_path / "calib.npz", x=random_images(64))
    monkeypatch.setattr(calibrate, "available_memory", lambda: 300 << 20)
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", data)
    assert code == 2, err
    line = _one_error_line(err)
    assert "calib.npz" in line and "240 MiB (80% of the memory available at the start)" in line
    assert not (tmp_path / "q.onnx").exists()
    monkeypatch.setattr(calibrate, "available_memory", lambda: 64 << 30)
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", data,
                       "--tolerance", "100")
    assert code == 0, err
