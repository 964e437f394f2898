"""Bad inputs from issues 7 and 17 that tests/test_errors.py does not cover yet: an opset newer than
the installed onnx/onnxruntime support, a missing external-data file, an op the target cannot run, a
kernel that throws while onnxruntime initializes (whose own log lines must stay off stderr), the
checker failure on every command, and calibration files that crashed before (pickled objects,
scalar or byte-string labels, values out of float32 range) or that rows read by seeking must still catch
(a truncated file, labels short of the samples past the ones read). Also from issue 17: an
already-quantized model given to a stage that rewrites float models, two nodes writing one value, an
opset too old to run that cannot be upgraded.

Each case asserts the exit code, one ``error:`` line (and at most a hint) naming the file, no
traceback (stderr is captured at the file-descriptor level, so onnxruntime's native logging
counts too), no output or temp file left, and every input byte-for-byte unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.parser
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_classifier, random_images, without_progress, write_npz


@pytest.fixture
def run_cli(capfd):
    """``onnxforge ARGS`` in-process; (exit code, stderr as the terminal would show it)."""
    from onnxforge.cli import main

    def invoke(*args) -> tuple[int, str]:
        capfd.readouterr()
        code = main([str(a) for a in args])
        return code, capfd.readouterr().err

    return invoke


def _digests(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def untouched(folder: Path):
    """Files in ``folder`` keep their bytes and nothing new appears (no output, no temp file)."""
    before = _digests(folder)
    yield
    after = _digests(folder)
    assert {p: after.get(p) for p in before} == before, "an input changed"
    assert sorted(set(after) - set(before)) == [], "files left behind"


def one_error_line(err: str, *fragments: str) -> str:
    """One ``error:`` line and at most a hint, after the progress lines of a command that ran past the
    progress delay (a prune before a teacher that exits); returns the error line."""
    assert "Traceback" not in err, err
    lines = [line for line in without_progress(err).splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint:")), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def _commands(model: Path, calib: Path, output: Path) -> dict[str, list]:
    return {
        "inspect": ["inspect", model],
        "simplify": ["simplify", model, "-o", output],
        "quantize": ["quantize", model, "-o", output, "--calibration", calib],
        "profile": ["profile", model, "--min-seconds", "0"],
        "fp16": ["fp16", model, "-o", output],
        "prune": ["prune", model, "-o", output],
        "prune-channels": ["prune", model, "-o", output, "--method", "channels"],
        "low-rank": ["prune", model, "-o", output, "--method", "low-rank"],
    }


# ----------------------------------------------------------------------------------------------
# Models


def _opset_too_new(folder: Path) -> Path:
    model = make_classifier()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 2
    return _save(model, folder / "opset_new.onnx")


def _ml_opset_unsupported(folder: Path) -> Path:
    model = make_classifier()
    model.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 99))  # onnx accepts it; onnxruntime does not
    return _save(model, folder / "ml_opset.onnx")


def _custom_op(folder: Path) -> Path:
    model = make_classifier()
    model.graph.node[1].op_type = "Frobnicate"
    model.graph.node[1].domain = "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    return _save(model, folder / "custom_op.onnx")


def _kernel_refuses_attribute(folder: Path) -> Path:
    """Loads (the checker and shape inference accept it) but onnxruntime's Resize kernel throws while the
    session initializes, which onnxruntime also logs as two colored lines of its own on stderr."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,8,8] x) => (float[N,3,8,8] y) {
            scales = Constant <value = float[4] {1.0, 1.0, 1.0, 1.0}> ()
            y = Resize <mode = "bogus"> (x, , scales)
        }""")
    return _save(model, folder / "bad_kernel.onnx")


def _checker_failure(folder: Path) -> Path:
    model = make_classifier()
    model.graph.node[1].input[0] = "no_such_tensor"
    return _save(model, folder / "broken.onnx")


def _already_quantized(folder: Path) -> Path:
    """The classifier with its input quantized to uint8 and back (QDQ), as a quantizer writes it."""
    model = make_classifier()
    model.graph.node[0].input[0] = "x_dq"
    model.graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", ["x_q", "scale", "zero"], ["x_dq"]))
    model.graph.node.insert(0, onnx.helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["x_q"]))
    model.graph.initializer.extend([onnx.helper.make_tensor("scale", onnx.TensorProto.FLOAT, [], [0.02]),
                                    onnx.helper.make_tensor("zero", onnx.TensorProto.UINT8, [], [128])])
    return _save(model, folder / "int8.onnx")


def _two_nodes_write_one_value(folder: Path) -> Path:
    model = make_classifier()
    model.graph.node[1].output[0] = "conv"  # Relu writes the Conv's output again: not single assignment
    model.graph.node[2].input[0] = "conv"
    return _save(model, folder / "not_ssa.onnx")


def _opset_too_old_to_upgrade(folder: Path) -> Path:
    # onnxruntime runs opset 7+; onnx's converter upgrades Gemm 6 -> 7 only with static dims
    return _save(make_classifier(opset=6), folder / "opset6.onnx")


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# (builder, commands that must fail, fragment of the message, exit code)
MODEL_CASES = {
    "opset_newer_than_onnx": (_opset_too_new, ["inspect", "simplify", "quantize", "profile"], "newer than", 2),
    "opset_onnxruntime_refuses": (_ml_opset_unsupported, ["simplify", "quantize", "profile"], "cannot load it", 2),
    "op_the_target_cannot_run": (_custom_op, ["simplify", "quantize", "profile"], "Frobnicate", 2),
    "fails_the_checker": (_checker_failure, ["inspect", "simplify", "quantize", "profile"], "checker", 2),
    "already_quantized": (
        _already_quantized,
        ["quantize", "fp16", "prune", "prune-channels", "low-rank"],
        "already quantized (it has DequantizeLinear, QuantizeLinear nodes)",
        2,
    ),
    "two_nodes_write_one_value": (
        _two_nodes_write_one_value,
        ["inspect", "simplify", "fp16", "prune", "prune-channels"],
        "single static assignment",
        2,
    ),
    "opset_too_old_to_upgrade": (
        _opset_too_old_to_upgrade,
        ["simplify", "quantize", "fp16", "prune", "prune-channels", "low-rank"],
        "opset 6 is older than onnxruntime runs",
        2,
    ),
    "kernel_fails_to_initialize": (
        _kernel_refuses_attribute,
        ["simplify", "quantize", "profile"],
        "Exception during initialization",
        2,
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_unusable_models(run_cli, tmp_path, case):
    build, commands, fragment, exit_code = MODEL_CASES[case]
    model = build(tmp_path)
    calib = write_npz(tmp_path / "calib.npz", x=random_images(16))
    output = tmp_path / "out.onnx"
    for command in commands:
        with untouched(tmp_path):
            code, err = run_cli(*_commands(model, calib, output)[command])
        assert code == exit_code, f"{command}: {err}"
        one_error_line(err, model.name, fragment)


def test_onnxruntime_logs_only_with_debug(run_cli, capfd, tmp_path):
    """onnxruntime's own "[E:onnxruntime:...]" lines stay off stderr, and come back with --debug."""
    model = _kernel_refuses_attribute(tmp_path)
    code, err = run_cli("profile", model, "--min-seconds", "0")
    assert code == 2 and "[E:onnxruntime" not in err and "\x1b[" not in err, err
    one_error_line(err, "bad_kernel.onnx", "Exception during initialization: mode attribute is bogus")
    with pytest.raises(Exception, match="Exception during initialization"):
        run_cli("--debug", "profile", model, "--min-seconds", "0")
    assert "[E:onnxruntime:" in capfd.readouterr().err
    code, err = run_cli("profile", model, "--min-seconds", "0")  # and quiet again after a --debug run
    assert code == 2 and "[E:onnxruntime" not in err, err


def test_missing_external_data_file(run_cli, tmp_path):
    model = tmp_path / "external.onnx"
    onnx.save_model(make_classifier(), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    (tmp_path / "external.onnx.data").unlink()
    calib = write_npz(tmp_path / "calib.npz", x=random_images(16))
    for command, args in _commands(model, calib, tmp_path / "out.onnx").items():
        with untouched(tmp_path):
            code, err = run_cli(*args)
        assert code == 2, f"{command}: {err}"
        one_error_line(err, "external.onnx", "external.onnx.data", "missing")


def test_external_data_model_works_when_complete(run_cli, tmp_path):
    """The control for the case above: the same model with its data file beside it is fine."""
    model = tmp_path / "external.onnx"
    onnx.save_model(make_classifier(), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    code, err = run_cli("profile", model, "--min-seconds", "0")
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# Calibration files


def _pickled_objects(path: Path) -> tuple[Path, str]:
    images = np.empty((16, 3, 8, 8), dtype=object)
    images[...] = 0.5
    np.savez(path, x=images)  # needs allow_pickle to read, which onnxforge never sets
    return path, "Python objects"


def _scalar_label(path: Path) -> tuple[Path, str]:
    return write_npz(path, x=random_images(16), label=np.int64(3)), "'label' must be an array"


def _byte_string_labels(path: Path) -> tuple[Path, str]:
    # text labels (numpy unicode) are read for a user metric (test_user_metric); bytes are neither that nor ids
    return write_npz(path, x=random_images(16), label=np.array([b"cat"] * 16)), "'label' must be an array"


def _out_of_float32_range(path: Path) -> tuple[Path, str]:
    images = random_images(16).astype(np.float64)
    images[3, 0, 0, 0] = 1e300  # finite as float64, Inf once cast to the model's float32
    return write_npz(path, x=images), "NaN/Inf"


def _truncated(path: Path) -> tuple[Path, str]:
    """Rows are read by seeking from the header (issue 17): a header promising more than the file holds."""
    path = path.with_suffix(".npy")
    np.save(path, random_images(16))
    path.write_bytes(path.read_bytes()[: 128 + 2 * 3 * 8 * 8 * 4])  # the header and 2 of 16 samples
    return path, "truncated"


def _labels_short_past_what_is_read(path: Path) -> tuple[Path, str]:
    """Only a prefix of the samples is read; the headers still show that the label count is off."""
    return write_npz(path, x=random_images(300), label=np.zeros(299, np.int64)), "299 labels for 300 samples"


CALIBRATION_CASES = {
    "pickled_objects": _pickled_objects,
    "scalar_label": _scalar_label,
    "byte_string_labels": _byte_string_labels,
    "out_of_float32_range": _out_of_float32_range,
    "truncated": _truncated,
    "labels_short_past_what_is_read": _labels_short_past_what_is_read,
}


@pytest.mark.parametrize("case", sorted(CALIBRATION_CASES))
def test_bad_calibration_files(run_cli, tmp_path, case):
    model = _save(make_classifier(), tmp_path / "classifier.onnx")
    data, fragment = CALIBRATION_CASES[case](tmp_path / f"{case}.npz")
    for args in (
        ["quantize", model, "-o", tmp_path / "int8.onnx", "--calibration", data],
        ["profile", model, "--min-seconds", "0", "--data", data],
    ):
        with untouched(tmp_path):
            code, err = run_cli(*args)
        assert code == 2, f"{args[0]}: {err}"
        one_error_line(err, data.name, fragment)
