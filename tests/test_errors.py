"""Error paths through the CLI: the exit code says what went wrong, stderr holds one clear line (and at
most a hint), there is never a traceback, no output file or temp file is left behind, and the inputs
are byte-for-byte unchanged."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import (
    assert_numerically_equal,
    make_classifier,
    random_images,
    save,
    sha256,
    without_progress,
    write_npz,
)

CUDA_AVAILABLE = "CUDAExecutionProvider" in ort.get_available_providers()
TENSORRT_AVAILABLE = "TensorrtExecutionProvider" in ort.get_available_providers()


def assert_one_error_line(err: str, *fragments: str, prefix: str = "error:") -> str:
    """stderr is one ``error:`` line, optionally followed by one ``hint:`` line, after the progress lines
    of a command that ran past the progress delay; returns the error line."""
    assert "Traceback" not in err, err
    lines = [line for line in without_progress(err).splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[0].startswith(prefix), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint:")), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@contextlib.contextmanager
def untouched(folder: Path, *outputs: Path):
    """Every file already in ``folder`` keeps its bytes; ``outputs`` and temp files do not appear."""
    before = {p: sha256(p) for p in folder.rglob("*") if p.is_file()}
    yield
    after = {p: sha256(p) for p in folder.rglob("*") if p.is_file()}
    changed = [str(p) for p in before if after.get(p) != before[p]]
    assert not changed, f"inputs changed or removed: {changed}"
    new = sorted(str(p.relative_to(folder)) for p in set(after) - set(before))
    assert not new, f"files left behind: {new}"
    for output in outputs:
        assert not output.exists(), f"{output} was written"


# ----------------------------------------------------------------------------------------------
# Unusable model files, for every command that reads one


def _bad_model(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.onnx"
    good = make_classifier().SerializeToString()
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "not_a_model":
        # a valid protobuf message, but a GraphProto rather than a ModelProto
        path.write_bytes(make_classifier().graph.SerializeToString())
    elif kind == "folder":
        path.mkdir()
    return path


BAD_MODELS = ["missing", "empty", "random", "truncated", "not_a_model", "folder"]


def _commands(model: Path, tmp: Path, output: Path) -> dict[str, list]:
    calib = write_npz(tmp / "calib.npz", x=random_images(16))
    return {
        "inspect": ["inspect", model],
        "simplify": ["simplify", model, "-o", output],
        "quantize": ["quantize", model, "-o", output, "--calibration", calib],
        "prune": ["prune", model, "-o", output],
        "profile": ["profile", model, "--min-seconds", "0.01"],
        "export": ["export", model, "-o", output],
    }


@pytest.mark.parametrize("command", ["inspect", "simplify", "quantize", "prune", "profile", "export"])
@pytest.mark.parametrize("kind", BAD_MODELS)
def test_unusable_model_file(cli, tmp_path, kind, command):
    model = _bad_model(kind, tmp_path)
    output = tmp_path / "out.onnx"
    args = _commands(model, tmp_path, output)[command]
    with untouched(tmp_path, output):
        code, _out, err = cli(*args)
    assert code == 2, err
    line = assert_one_error_line(err)
    assert model.name in line  # the message names the file


def test_error_messages_say_what_is_wrong(cli, tmp_path):
    expectations = {
        "missing": "no such file",
        "empty": "empty",
        "random": "not a readable ONNX model",
        "truncated": "not a readable ONNX model",
        "not_a_model": "no ONNX graph",
        "folder": "folder",
    }
    for kind, fragment in expectations.items():
        code, _, err = cli("inspect", _bad_model(kind, tmp_path))
        assert code == 2
        assert_one_error_line(err, fragment)


def test_model_failing_the_checker(cli, tmp_path):
    model = make_classifier()
    model.graph.node[1].input[0] = "no_such_tensor"  # Relu reads a value nothing produces
    path = save(model, tmp_path / "broken.onnx")
    with untouched(tmp_path, tmp_path / "out.onnx"):
        code, _, err = cli("simplify", path, "-o", tmp_path / "out.onnx")
    assert code == 2
    assert_one_error_line(err, "checker")


def test_real_process_prints_no_traceback(tmp_path):
    """The installed entry point, not just main(): exit status 2 and one line on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge", "inspect", str(tmp_path / "nope.onnx")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "nope.onnx", "no such file")
    assert result.stdout == ""


def test_debug_flag_shows_the_exception(tmp_path):
    from onnxforge.cli import main
    from onnxforge.errors import InvalidModelError

    with pytest.raises(InvalidModelError):
        main(["--debug", "inspect", str(tmp_path / "nope.onnx")])


def test_unexpected_exception_is_exit_1_with_one_line(cli, classifier_path, monkeypatch):
    import onnxforge.inspection

    def explode(path):
        raise RuntimeError("something onnxforge did not expect\nsecond line")

    monkeypatch.setattr(onnxforge.inspection, "inspect_model", explode)
    code, _, err = cli("inspect", classifier_path)
    assert code == 1
    assert_one_error_line(err, "RuntimeError", "something onnxforge did not expect", prefix="internal error:")
    assert "second line" not in err


def test_bad_option_value_is_exit_2(cli, classifier_path):
    code, _, err = cli("prune", classifier_path, "-o", classifier_path.with_name("p.onnx"), "--sparsity", "lots")
    assert code == 2
    assert_one_error_line(err, "--sparsity")


# ----------------------------------------------------------------------------------------------
# Output paths


@pytest.fixture
def same_path_commands(classifier_path, calibration_npz):
    return {
        "simplify": ["simplify", classifier_path, "-o", classifier_path],
        "quantize": ["quantize", classifier_path, "-o", classifier_path, "--calibration", calibration_npz],
        "prune": ["prune", classifier_path, "-o", classifier_path],
        "export": ["export", classifier_path, "-o", classifier_path],
    }


@pytest.mark.parametrize("command", ["simplify", "quantize", "prune", "export"])
def test_output_equal_to_input_is_refused(cli, tmp_path, same_path_commands, command):
    with untouched(tmp_path):
        code, _, err = cli(*same_path_commands[command])
    assert code == 2
    assert_one_error_line(err, "input")


def test_output_equal_to_input_through_another_spelling(cli, classifier_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with untouched(tmp_path):
        code, _, err = cli("simplify", classifier_path, "-o", Path("sub") / ".." / classifier_path.name)
    assert code == 2
    assert_one_error_line(err)


@pytest.mark.parametrize("command", ["simplify", "quantize", "prune", "export", "inspect-json"])
def test_output_folder_that_is_a_file(cli, tmp_path, classifier_path, calibration_npz, command):
    # Tests run as root, where os.access() says every folder is writable; a parent that is a
    # regular file cannot be written by anyone.
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    output = blocker / "out.onnx"
    args = {
        "simplify": ["simplify", classifier_path, "-o", output],
        "quantize": ["quantize", classifier_path, "-o", output, "--calibration", calibration_npz],
        "prune": ["prune", classifier_path, "-o", output],
        "export": ["export", classifier_path, "-o", output],
        "inspect-json": ["inspect", classifier_path, "--json", blocker / "report.json"],
    }[command]
    with untouched(tmp_path):
        code, _, err = cli(*args)
    assert code == 2
    assert_one_error_line(err, "blocker")


def test_output_path_that_is_a_folder(cli, tmp_path, classifier_path):
    folder = tmp_path / "a_folder.onnx"
    folder.mkdir()
    with untouched(tmp_path):
        code, _, err = cli("simplify", classifier_path, "-o", folder)
    assert code == 2
    assert_one_error_line(err)


def test_export_never_overwrites_its_python_source(cli, torch_model_file, tmp_path):
    with untouched(tmp_path):
        code, _, _err = cli(
            "export", f"{torch_model_file}:build", "-o", torch_model_file, "--input-shape", "input=1x3x8x8"
        )
    assert code == 2


def test_quantize_never_overwrites_its_calibration_data(cli, tmp_path, classifier_path, calibration_npz):
    with untouched(tmp_path):
        code, _, _err = cli("quantize", classifier_path, "-o", calibration_npz, "--calibration", calibration_npz,
                            "--tolerance", "100")
    assert code == 2


def test_prune_never_overwrites_its_eval_data(cli, tmp_path, classifier_path, eval_npz):
    with untouched(tmp_path):
        code, _, _err = cli("prune", classifier_path, "-o", eval_npz, "--eval", eval_npz, "--tolerance", "100")
    assert code == 2


def test_json_report_never_overwrites_the_model(cli, tmp_path, classifier_path):
    with untouched(tmp_path):
        code, _, _err = cli("inspect", classifier_path, "--json", classifier_path)
    assert code == 2


# ----------------------------------------------------------------------------------------------
# Calibration and evaluation data


def _bad_samples(kind: str, folder: Path) -> tuple[Path, str]:
    """(an .npz for the tiny classifier with one defect, a fragment the error must contain)."""
    images = random_images(16)
    path = folder / f"{kind}.npz"
    if kind == "wrong_name":
        return write_npz(path, image=images), "'x'"
    if kind == "strings":
        return write_npz(path, x=np.array(["a picture"] * 16)), "dtype"
    if kind == "integers":
        return write_npz(path, x=(images * 10).astype(np.int32)), "dtype"
    if kind == "wrong_rank":
        return write_npz(path, x=images[:, 0]), "rank"
    if kind == "wrong_size":
        return write_npz(path, x=np.zeros((16, 3, 4, 4), np.float32)), "shape"
    if kind == "nan":
        bad = images.copy()
        bad[5, 1, 2, 3] = np.nan
        return write_npz(path, x=bad), "NaN"
    if kind == "inf":
        bad = images.copy()
        bad[0, 0, 0, 0] = np.inf
        return write_npz(path, x=bad), "NaN/Inf"
    if kind == "zero_samples":
        return write_npz(path, x=images[:0]), "0 samples"
    if kind == "not_npz":
        path.write_bytes(b"this is not numpy data")
        return path, ""
    if kind == "corrupt_npz":
        write_npz(path, x=images)
        path.write_bytes(path.read_bytes()[:200])
        return path, "not a readable"
    if kind == "object_array":
        np.savez(path, x=np.array([images[0], images[1][:2]], dtype=object))
        return path, "object"
    if kind == "missing":
        return path, "no such file"
    if kind == "label_count":
        return write_npz(path, x=images, label=np.zeros(3, np.int64)), "labels"
    raise AssertionError(kind)


BAD_SAMPLES = [
    "wrong_name", "strings", "integers", "wrong_rank", "wrong_size", "nan", "inf", "zero_samples", "not_npz",
    "corrupt_npz", "object_array", "missing", "label_count",
]


@pytest.mark.parametrize("kind", BAD_SAMPLES)
def test_bad_calibration_data(cli, tmp_path, classifier_path, kind):
    data, fragment = _bad_samples(kind, tmp_path)
    output = tmp_path / "int8.onnx"
    with untouched(tmp_path, output):
        code, _, err = cli("quantize", classifier_path, "-o", output, "--calibration", data)
    assert code == 2, err
    assert_one_error_line(err, data.name, fragment)


@pytest.mark.parametrize("kind", ["wrong_name", "strings", "wrong_rank", "nan", "zero_samples"])
def test_bad_eval_data(cli, tmp_path, classifier_path, calibration_npz, kind):
    data, fragment = _bad_samples(kind, tmp_path)
    for args in (
        ["quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz, "--eval", data],
        ["prune", classifier_path, "-o", tmp_path / "p.onnx", "--eval", data],
    ):
        with untouched(tmp_path, tmp_path / "q.onnx", tmp_path / "p.onnx"):
            code, _, err = cli(*args)
        assert code == 2, err
        assert_one_error_line(err, data.name, fragment)


@pytest.mark.parametrize("kind", ["wrong_name", "wrong_rank", "nan"])
def test_bad_profile_data(cli, tmp_path, classifier_path, kind):
    data, fragment = _bad_samples(kind, tmp_path)
    code, _, err = cli("profile", classifier_path, "--data", data, "--min-seconds", "0.01")
    assert code == 2
    assert_one_error_line(err, fragment)


def test_junk_calibration_file_is_not_called_pickled_objects(cli, tmp_path, classifier_path):
    data, _ = _bad_samples("not_npz", tmp_path)
    code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", data)
    assert code == 2
    line = assert_one_error_line(err, data.name)
    assert "Python objects" not in line and "object dtype" not in line


def test_one_calibration_sample_cannot_also_be_held_out(cli, tmp_path, classifier_path):
    data = write_npz(tmp_path / "one.npz", x=random_images(1))
    with untouched(tmp_path, tmp_path / "q.onnx"):
        code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", data)
    assert code == 2
    assert_one_error_line(err, "too few")


def test_accuracy_metric_needs_labels(cli, tmp_path, classifier_path, calibration_npz):
    with untouched(tmp_path, tmp_path / "q.onnx"):
        code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz,
                           "--metric", "accuracy")
    assert code == 2
    assert_one_error_line(err, "label")


def test_max_samples_must_be_positive(cli, tmp_path, classifier_path, calibration_npz):
    with untouched(tmp_path, tmp_path / "q.onnx"):
        code, _, err = cli("quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz,
                           "--max-samples", "0")
    assert code == 2
    assert_one_error_line(err, "--max-samples")


def test_fixed_batch_model_with_few_samples(cli, tmp_path, int8_faster):
    model = save(make_classifier(batch=4), tmp_path / "fixed4.onnx")
    data = write_npz(tmp_path / "calib.npz", x=random_images(10))  # 8 to calibrate, 2 held out
    code, _, err = cli("quantize", model, "-o", tmp_path / "q.onnx", "--calibration", data, "--tolerance", "100")
    assert "internal error" not in err
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize("command", ["quantize", "profile"])
def test_unknown_target_is_exit_2(cli, tmp_path, classifier_path, calibration_npz, command):
    args = {
        "quantize": ["quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz],
        "profile": ["profile", classifier_path],
    }[command]
    with untouched(tmp_path, tmp_path / "q.onnx"):
        code, _, err = cli(*args, "--target", "tpu")
    assert code == 2
    assert_one_error_line(err, "tpu")


@pytest.mark.skipif(CUDA_AVAILABLE, reason="CUDAExecutionProvider is available here")
@pytest.mark.parametrize("command", ["quantize", "profile"])
def test_unavailable_cuda_target_is_exit_3(cli, tmp_path, classifier_path, calibration_npz, command):
    args = {
        "quantize": ["quantize", classifier_path, "-o", tmp_path / "q.onnx", "--calibration", calibration_npz],
        "profile": ["profile", classifier_path],
    }[command]
    with untouched(tmp_path, tmp_path / "q.onnx"):
        code, _, err = cli(*args, "--target", "cuda")
    assert code == 3
    assert_one_error_line(err, "CUDAExecutionProvider")


@pytest.mark.skipif(TENSORRT_AVAILABLE, reason="TensorrtExecutionProvider is available here")
def test_unavailable_tensorrt_target_is_exit_3(cli, classifier_path):
    code, _, err = cli("profile", classifier_path, "--target", "tensorrt")
    assert code == 3
    assert_one_error_line(err, "TensorrtExecutionProvider")


@pytest.mark.skipif(CUDA_AVAILABLE, reason="CUDAExecutionProvider is available here")
def test_unavailable_target_in_a_recipe_is_exit_3(cli, tmp_path, classifier_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {classifier_path.name}\ntarget: cuda\nstages: [simplify]\n")
    code, _, err = cli("run", recipe, "-o", tmp_path / "run")
    assert code == 3
    assert_one_error_line(err, "cuda")
    assert not (tmp_path / "run" / "01_simplify.onnx").exists()


@pytest.mark.skipif(CUDA_AVAILABLE, reason="CUDAExecutionProvider is available here")
def test_gpu_target_hint_says_what_to_install(cli, classifier_path):
    code, _, err = cli("profile", classifier_path, "--target", "cuda")
    assert code == 3
    hint = err.strip().splitlines()[-1]
    assert hint.startswith("hint:") and "onnxruntime-gpu" in hint


# ----------------------------------------------------------------------------------------------
# Names with brackets: messages are text, not rich markup (rich used to eat '[v2]' and crash on '[/b]')


def test_path_with_brackets_is_printed_verbatim(cli, tmp_path):
    code, _, err = cli("inspect", tmp_path / "model[v2].onnx")
    assert code == 2
    assert_one_error_line(err, "model[v2].onnx")


def test_path_with_closing_tag_does_not_crash(cli, tmp_path):
    folder = tmp_path / "x["
    folder.mkdir()
    code, _, err = cli("inspect", folder / "b].onnx")  # the message holds 'x[/b].onnx'
    assert code == 2
    assert_one_error_line(err, "no such file")


# ----------------------------------------------------------------------------------------------
# Quality gates: exit 4, the best model is still saved


def test_quantize_gate_failure_saves_the_best_model(cli, tmp_path, classifier_path, calibration_npz, feeds):
    output = tmp_path / "int8.onnx"
    input_hash = sha256(classifier_path)
    code, _out, err = cli(
        "quantize", classifier_path, "-o", output, "--calibration", calibration_npz,
        "--metric", "cosine", "--tolerance", "0.999999",
    )
    assert code == 4, err
    assert_one_error_line(err, "tolerance", str(output))
    assert sha256(classifier_path) == input_hash
    model = onnx.load(str(output))
    onnx.checker.check_model(model)
    # the saved best candidate is a quantized model that still approximates the fp32 one
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in model.graph.node)
    assert_numerically_equal(classifier_path, output, feeds, atol=0.5, rtol=0.5)
    assert not list(tmp_path.glob(".*.tmp"))


def test_prune_gate_failure_saves_the_unpruned_model(cli, tmp_path, classifier_path, eval_npz, feeds):
    output = tmp_path / "sparse.onnx"
    input_hash = sha256(classifier_path)
    code, _out, err = cli(
        "prune", classifier_path, "-o", output, "--sparsity", "0.95", "--eval", eval_npz,
        "--metric", "cosine", "--tolerance", "1.000001",
    )
    assert code == 4, err
    assert_one_error_line(err, "tolerance", str(output))
    assert sha256(classifier_path) == input_hash
    # no sparsity passed, so the best model is the dense one: numerically the input
    assert_numerically_equal(classifier_path, output, feeds, atol=0, rtol=0)


def test_export_parity_failure_keeps_the_unverified_file(cli, tmp_path, torch_model_file):
    output = tmp_path / "e.onnx"
    code, _out, err = cli(
        "export", f"{torch_model_file}:build", "-o", output, "--input-shape", "input=1x3x8x8",
        "--atol", "0", "--rtol", "0",
    )
    assert code == 4, err
    assert_one_error_line(err, "parity")
    assert "random inputs" in err and "--sample" in err  # the hint points at real data
    onnx.checker.check_model(onnx.load(str(output)))


# ----------------------------------------------------------------------------------------------
# Recipes


RECIPE_ERRORS = {
    "unknown_top_key": ("colour: blue\nstages: [simplify]\n", "colour"),
    "unknown_stage_key": ("stages:\n  - prune: {sparsityy: 0.2}\n", "sparsityy"),
    "wrong_type": ("stages:\n  - prune: {sparsity: high}\n", "sparsity"),
    "wrong_bool": ("dynamic_batch: 'yes'\nstages: [simplify]\n", "dynamic_batch"),
    "bad_enum": ("stages:\n  - prune: {scope: everywhere}\n", "scope"),
    "out_of_range": ("stages:\n  - prune: {sparsity: 1.5}\n", "sparsity"),
    "unknown_stage": ("stages: [simplify, frobnicate]\n", "frobnicate"),
    "missing_calibration_file": ("calibration: nowhere.npz\nstages: [quantize]\n", "nowhere.npz"),
    "quantize_without_calibration": ("stages: [simplify, quantize]\n", "calibration"),
    "stages_not_a_list": ("stages: simplify\n", "stages"),
    "unknown_target": ("target: tpu\nstages: [simplify]\n", "tpu"),
    "export_not_first": ("stages: [simplify, export]\n", "export"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_ERRORS))
def test_recipe_errors(cli, tmp_path, classifier_path, case):
    body, fragment = RECIPE_ERRORS[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {classifier_path.name}\n{body}")
    run_dir = tmp_path / "run"
    with untouched(tmp_path):
        code, _, err = cli("run", recipe, "-o", run_dir)
    assert code == 2, err
    assert_one_error_line(err, fragment)
    assert not run_dir.exists()


def test_recipe_with_missing_model_file(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: gone.onnx\nstages: [simplify]\n")
    code, _, err = cli("run", recipe, "-o", tmp_path / "run")
    assert code == 2
    assert_one_error_line(err, "gone.onnx")


def test_missing_recipe_file(cli, tmp_path):
    code, _, err = cli("run", tmp_path / "nope.yaml", "-o", tmp_path / "run")
    assert code == 2
    assert_one_error_line(err, "nope.yaml")


def test_recipe_that_is_not_yaml(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: [unclosed\n  : : :")
    code, _, err = cli("run", recipe, "-o", tmp_path / "run")
    assert code == 2
    assert_one_error_line(err, "YAML")


def test_recipe_that_is_a_list(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- export\n- simplify\n")
    code, _, err = cli("run", recipe, "-o", tmp_path / "run")
    assert code == 2
    assert_one_error_line(err, "mapping")


def test_recipe_tolerance_of_wrong_type(cli, tmp_path, classifier_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {classifier_path.name}\nstages:\n  - simplify: {{tolerance: {{atol: abc}}}}\n")
    code, _, err = cli("run", recipe, "-o", tmp_path / "run")
    assert code == 2, err
    assert_one_error_line(err, "atol")


def test_recipe_zero_calibration_samples(cli, tmp_path, classifier_path, calibration_npz):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {classifier_path.name}\ncalibration: {calibration_npz.name}\n"
        "stages:\n  - quantize: {max_samples: 0}\n"
    )
    code, _, err = cli("run", recipe, "-o", tmp_path / "run")
    assert code == 2, err
    assert_one_error_line(err, "max_samples and analysis_samples must be at least 1")


def test_recipe_old_sample_key_names_the_new_one(cli, tmp_path, classifier_path, calibration_npz):
    """The recipe key is the CLI's --max-samples; the old spelling is refused with the new key's name."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {classifier_path.name}\ncalibration: {calibration_npz.name}\n"
        "stages:\n  - quantize: {max_calibration_samples: 64}\n"
    )
    code, _, err = cli("run", recipe, "-o", tmp_path / "run")
    assert code == 2, err
    line = assert_one_error_line(err, "stages[0].quantize", "'max_calibration_samples' is now called 'max_samples'")
    assert "known keys" not in line
    assert "max_samples: 64" in err  # the hint spells the fix


def test_failed_stage_is_recorded_in_the_manifest(cli, tmp_path, classifier_path):
    import json

    bad_eval = write_npz(tmp_path / "eval.npz", image=random_images(8))  # wrong input name
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {classifier_path.name}\neval: {bad_eval.name}\nstages: [simplify, {{prune: {{sparsity: 0.2}}}}]\n"
    )
    run_dir = tmp_path / "run"
    code, _, err = cli("run", recipe, "-o", run_dir)
    assert code == 2
    assert_one_error_line(err, "'x'")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["completed"] == ["simplify"]
    assert [(s["name"], s["status"]) for s in manifest["stages"]] == [("simplify", "done"), ("prune", "failed")]
    assert "'x'" in manifest["stages"][1]["error"]
    assert not (run_dir / "02_prune.onnx").exists()


# ----------------------------------------------------------------------------------------------
# Export sources


EXPORT_SOURCES = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Linear4(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    class SingularValues(nn.Module):
        # aten::linalg_svdvals has no ONNX symbolic in either exporter (checked with torch 2.13)
        def forward(self, x):
            return torch.linalg.svdvals(x)

    class NoTensors(nn.Module):
        def forward(self, x):
            return None

    def linear4():
        return Linear4()

    def svdvals():
        return SingularValues()

    def no_tensors():
        return NoTensors()

    def a_number():
        return 42

    def raises():
        raise RuntimeError("cannot build today")

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def sources(tmp_path) -> Path:
    path = tmp_path / "sources.py"
    path.write_text(EXPORT_SOURCES)
    return path


EXPORT_ERRORS = {
    "no_such_callable": ("sources.py:does_not_exist", ["x=2x4"], "does_not_exist"),
    "returns_a_number": ("sources.py:a_number", ["x=2x4"], "not a model"),
    "not_callable": ("sources.py:NOT_CALLABLE", ["x=2x4"], "not callable"),
    "factory_raises": ("sources.py:raises", ["x=2x4"], "cannot build today"),
    "forward_fails_on_shape": ("sources.py:linear4", ["x=2x5"], "forward failed"),
    "forward_returns_no_tensor": ("sources.py:no_tensors", ["x=2x4"], "no tensors"),
    "no_input_shape": ("sources.py:linear4", [], "input shape"),
    "wrong_input_name": ("sources.py:linear4", ["y=2x4"], "'y'"),
    "bad_shape_text": ("sources.py:linear4", ["x=2xfour"], "x=2xfour"),
    "py_without_callable": ("sources.py", ["x=2x4"], "sources.py"),
    "missing_py": ("elsewhere.py:build", ["x=2x4"], "elsewhere.py"),
    "unknown_builtin": ("builtin:resnet9000", [], "resnet9000"),
    "unknown_suffix": ("weights.h5", [], "weights.h5"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_ERRORS))
def test_export_errors(cli, tmp_path, sources, monkeypatch, case):
    source, shapes, fragment = EXPORT_ERRORS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    output = tmp_path / "out.onnx"
    shape_args = [a for s in shapes for a in ("--input-shape", s)]
    with untouched(tmp_path, output):
        code, _, err = cli("export", source, "-o", output, *shape_args)
    assert code == 2, err
    assert_one_error_line(err, fragment)


def test_export_of_a_python_file_that_does_not_import(cli, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nthis is not python\n")
    with untouched(tmp_path, tmp_path / "out.onnx"):
        code, _, err = cli("export", f"{broken}:build", "-o", tmp_path / "out.onnx", "--input-shape", "x=1x4")
    assert code == 2
    assert_one_error_line(err, "broken.py", "import")


def test_export_of_a_state_dict_is_explained(cli, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), weights)
    with untouched(tmp_path, tmp_path / "out.onnx"):
        code, _, err = cli("export", weights, "-o", tmp_path / "out.onnx", "--input-shape", "x=1x4")
    assert code == 2
    assert_one_error_line(err, "TorchScript")
    assert "state_dict" in err  # the hint explains why a weights file cannot be exported on its own


def test_export_of_an_op_without_onnx_support(tmp_path, sources, capfd):
    """Both exporters fail on aten::linalg_svdvals: exit 2, a message naming the op, no file."""
    from onnxforge.cli import main

    output = tmp_path / "out.onnx"
    with untouched(tmp_path, output):
        code = main(["export", f"{sources}:svdvals", "-o", str(output), "--input-shape", "x=2x4x4"])
    captured = capfd.readouterr()
    assert code == 2, f"did torch gain an ONNX export for linalg_svdvals? pick another op. {captured.err}"
    assert_one_error_line(captured.err, "every exporter", "svdvals")


def test_export_failure_output_is_clean(tmp_path, sources, capfd):
    """torch's own messages carry ANSI colour codes, and the TorchScript exporter dumps its IR graph
    to file descriptor 1: neither may reach the user."""
    from onnxforge.cli import main

    code = main(["export", f"{sources}:svdvals", "-o", str(tmp_path / "out.onnx"), "--input-shape", "x=2x4x4"])
    captured = capfd.readouterr()
    assert code == 2
    assert "\x1b[" not in captured.err
    assert captured.out == ""
