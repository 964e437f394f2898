"""The output guard: no command and no recipe run writes over a file it reads, through any alias, and
``--json`` is checked before any work and never replaces a pipe, a device or /dev/stdout.

Refusals are exit 2 with one ``error:`` line, nothing written, every input unchanged.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_classifier, random_images, write_npz
from test_bad_inputs import one_error_line, run_cli, untouched  # noqa: F401


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(make_classifier().SerializeToString())
    write_npz(folder / "calib.npz", x=random_images(16))
    return folder


def _external_data_model(folder: Path) -> Path:
    model = folder / "external.onnx"
    onnx.save_model(make_classifier(), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return model


# ----------------------------------------------------------------------------------------------
# -o aliasing an input


def test_output_over_the_inputs_external_data_is_refused(run_cli, inputs):
    model = _external_data_model(inputs)
    with untouched(inputs):
        code, err = run_cli("simplify", model, "-o", inputs / "weights.bin")
    assert code == 2, err
    one_error_line(err, "weights.bin", "external-data file")


def test_output_hard_linked_to_the_input_is_refused(run_cli, inputs, tmp_path):
    link = tmp_path / "linked.onnx"
    os.link(inputs / "model.onnx", link)
    with untouched(inputs):
        code, err = run_cli("simplify", inputs / "model.onnx", "-o", link)
    assert code == 2, err
    one_error_line(err, "input")


def test_output_over_a_file_in_the_calibration_folder_is_refused(run_cli, inputs, tmp_path):
    calib = inputs / "calib"
    calib.mkdir()
    for part in ("part0.npz", "part1.npz"):
        write_npz(calib / part, x=random_images(16))
    with untouched(inputs):
        code, err = run_cli("quantize", inputs / "model.onnx", "-o", calib / "part1.npz", "--calibration", calib)
    assert code == 2, err
    one_error_line(err, "part1.npz", "in a folder this command reads")


def test_a_new_file_in_an_input_folder_is_fine(tmp_path):
    from onnxforge._atomic import check_output_path

    (tmp_path / "calib").mkdir()
    assert check_output_path(tmp_path / "calib" / "int8.onnx", tmp_path / "calib") == tmp_path / "calib" / "int8.onnx"


def test_model_output_that_is_a_fifo_or_device_is_refused(run_cli, inputs, tmp_path):
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    for output in (fifo, Path(os.devnull)):
        code, err = run_cli("simplify", inputs / "model.onnx", "-o", output)
        assert code == 2, err
        one_error_line(err, "not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_guard_checks_the_data_file_a_large_output_would_write(tmp_path):
    from onnxforge._atomic import check_output_path
    from onnxforge.errors import OutputPathError

    data = tmp_path / "big.onnx.data"
    data.write_bytes(b"read by this command")
    with pytest.raises(OutputPathError, match=r"big\.onnx\.data"):
        check_output_path(tmp_path / "big.onnx", data)


# ----------------------------------------------------------------------------------------------
# --json


def test_json_naming_the_input_is_refused_before_any_work(run_cli, inputs, tmp_path):
    output = tmp_path / "int8.onnx"
    with untouched(inputs):
        code, err = run_cli("quantize", inputs / "model.onnx", "-o", output, "--calibration", inputs / "calib.npz",
                            "--json", inputs / "calib.npz")
    assert code == 2, err
    one_error_line(err, "calib.npz", "input")
    assert not output.exists(), "the model was written before --json was refused"


def test_json_naming_the_output_is_refused_before_any_work(run_cli, inputs, tmp_path):
    output = tmp_path / "simple.onnx"
    with untouched(inputs):
        code, err = run_cli("simplify", inputs / "model.onnx", "-o", output, "--json", output)
    assert code == 2, err
    one_error_line(err, "also written")
    assert not output.exists()


def test_json_naming_the_export_source_is_refused(run_cli, tmp_path):
    source = tmp_path / "model.py"
    source.write_text("raise SystemExit('the source must not even run')\n")
    with untouched(tmp_path):
        code, err = run_cli("export", f"{source}:build", "-o", tmp_path / "m.onnx", "--json", source)
    assert code == 2, err
    one_error_line(err, "model.py", "input")


def test_json_naming_the_distillation_teacher_is_refused_before_any_work(run_cli, inputs, tmp_path):
    teacher = tmp_path / "teacher.py"
    teacher.write_text("raise SystemExit('the teacher must not even run')\n")
    output = tmp_path / "kd.onnx"
    with untouched(tmp_path), untouched(inputs):
        code, err = run_cli("prune", inputs / "model.onnx", "-o", output, "--method", "channels", "--ratio", "0.5",
                            "--calibration", inputs / "calib.npz", "--distill", f"{teacher}:build", "--json", teacher)
    assert code == 2, err
    one_error_line(err, "teacher.py", "input")
    assert not output.exists()


def test_json_into_a_fifo_is_written_not_replaced(run_cli, inputs, tmp_path):
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    code, err = run_cli("inspect", inputs / "model.onnx", "--json", fifo)
    reader.join(timeout=30)
    assert code == 0, err
    assert stat.S_ISFIFO(fifo.stat().st_mode), "the FIFO was replaced"
    assert json.loads(received[0])["nodes"] == 4


def test_json_into_a_process_substitution(run_cli, inputs):
    """``--json >(cat)``: bash passes /dev/fd/N, a pipe; it used to be an internal error."""
    read_end, write_end = os.pipe()
    try:
        code, err = run_cli("inspect", inputs / "model.onnx", "--json", f"/dev/fd/{write_end}")
    finally:
        os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    assert code == 0, err
    assert json.loads(text)["nodes"] == 4


def test_json_through_a_symlink_to_dev_stdout_keeps_the_link(inputs, tmp_path, capfd):
    from onnxforge.cli import main

    link = tmp_path / "report.json"
    link.symlink_to("/dev/stdout")
    code = main(["inspect", str(inputs / "model.onnx"), "--json", str(link)])
    out = capfd.readouterr().out
    assert code == 0
    assert link.is_symlink() and os.readlink(link) == "/dev/stdout"
    assert '"nodes": 4' in out


def test_json_into_a_socket_is_refused(run_cli, inputs, tmp_path):
    import socket

    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        code, err = run_cli("inspect", inputs / "model.onnx", "--json", path)
    finally:
        server.close()
    assert code == 2, err
    one_error_line(err, "not a regular file")


# ----------------------------------------------------------------------------------------------
# recipe runs


def test_run_that_would_overwrite_its_own_model_is_refused_up_front(run_cli, inputs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = run_dir / "02_quantize.onnx"  # an earlier run's output, now the recipe's model
    model.write_bytes((inputs / "model.onnx").read_bytes())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\ncalibration: {inputs / 'calib.npz'}\nstages: [simplify, quantize]\n")
    with untouched(tmp_path):
        code, err = run_cli("run", recipe, "-o", run_dir)
    assert code == 2, err
    one_error_line(err, "02_quantize.onnx", "input")


def test_run_json_naming_a_recipe_input_is_refused_before_any_work(run_cli, inputs, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {inputs / 'model.onnx'}\nstages: [simplify]\n")
    with untouched(tmp_path):
        code, err = run_cli("run", recipe, "-o", tmp_path / "run", "--json", inputs / "model.onnx")
    assert code == 2, err
    one_error_line(err, "model.onnx", "input")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", "..", "back\\slash"])
def test_recipe_name_must_be_a_plain_name(run_cli, inputs, tmp_path, monkeypatch, name):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"name": name, "model": str(inputs / "model.onnx"), "stages": ["simplify"]}))
    monkeypatch.chdir(inputs)
    with untouched(tmp_path):
        code, err = run_cli("run", recipe)
    assert code == 2, err
    one_error_line(err, "plain name")
    assert not (tmp_path / "escaped").exists() and not (inputs / "runs").exists()
