"""Property-based fuzzing: damaged models and calibration data go into ``inspect``, ``simplify``,
``quantize`` and ``profile``, through the Python API and through the CLI.

The properties: the library raises nothing but OnnxForgeError subclasses; the CLI exits 0, 2, 3
or 4 (never 1, the "bug in onnxforge" code) with no traceback; a failed command leaves no output
and no temp file behind, and never changes its input.

CI runs a small, fixed set of examples (``derandomize=True``: the same cases every run). A longer,
random run by hand::

    ONNXFORGE_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/reliability/test_fuzz.py \\
        --hypothesis-show-statistics -q

(``--hypothesis-show-statistics`` prints how many cases each property ran.)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import without_progress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutations import (
    BASE_MODELS,
    apply_bytes,
    build_calibration,
    build_model_bytes,
    byte_mutations,
    calibration_arrays,
    damaged_models,
    write_calibration,
)

from onnxforge.errors import OnnxForgeError, QualityGateError

_LONG_RUN = int(os.environ.get("ONNXFORGE_FUZZ_EXAMPLES", "0"))


def fuzz_settings(ci_examples: int) -> settings:
    """CI: ``ci_examples`` fixed cases. By hand: ONNXFORGE_FUZZ_EXAMPLES random ones, and a found
    failure is kept in .hypothesis/ and replayed first next time."""
    if _LONG_RUN:
        return settings(max_examples=_LONG_RUN, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    return settings(
        max_examples=ci_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _quick_quantize_config():
    from onnxforge.pipeline.quantize import QuantizeConfig

    # the same code paths as the defaults, with less timing and no optional analysis
    return QuantizeConfig(latency_rounds=2, mixed_precision=False, error_report=False, max_samples=8)


def _quick_profile_config(sample_data: Path | None = None):
    from onnxforge.targets.profile import ProfileConfig

    return ProfileConfig(min_seconds=0.0, min_runs=2, warmup=1, sample_data=sample_data)


def _valid_calibration(folder: Path) -> Path:
    arrays = build_calibration({"samples": 12, "dtype": "float32", "shape": "ok", "poison": None, "key": "x",
                                "extra": None})
    return write_calibration(folder / "calib.npz", arrays)


def _call_library(command: str, model: Path, folder: Path, calibration: Path) -> None:
    """One library call; only OnnxForgeError may escape, and a failure leaves nothing behind."""
    output = folder / "out.onnx"
    before = {p.name: _digest(p) for p in folder.iterdir()}
    try:
        if command == "inspect":
            from onnxforge.inspection import inspect_model

            inspect_model(model)
        elif command == "simplify":
            from onnxforge.pipeline.simplify import simplify

            simplify(model, output)
        elif command == "quantize":
            from onnxforge.pipeline.quantize import quantize

            quantize(model, output, calibration, _quick_quantize_config())
        elif command == "profile":
            from onnxforge.targets.profile import profile

            profile(model, _quick_profile_config())
        else:
            raise AssertionError(command)
    except QualityGateError:
        assert output.exists(), "a quality-gate failure must still save the best model"
    except OnnxForgeError:
        assert not output.exists(), f"{command} failed but left {output.name}"
    after = {p.name: _digest(p) for p in folder.iterdir()}
    assert {k: after.get(k) for k in before} == before, f"{command} changed its inputs"
    assert not [n for n in after if n.endswith(".tmp")], f"{command} left temp files: {sorted(after)}"


# ----------------------------------------------------------------------------------------------
# Damaged models, Python API


@fuzz_settings(ci_examples=100)
@given(case=damaged_models(), command=st.sampled_from(["inspect", "quantize", "profile"]))
def test_library_on_damaged_models(case, command):
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp)
        calibration = _valid_calibration(folder)
        model = folder / "model.onnx"
        model.write_bytes(build_model_bytes(case))
        _call_library(command, model, folder, calibration)


@fuzz_settings(ci_examples=20)  # three simplifiers per call: the slowest command
@given(case=damaged_models())
def test_simplify_on_damaged_models(case):
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp)
        model = folder / "model.onnx"
        model.write_bytes(build_model_bytes(case))
        _call_library("simplify", model, folder, folder / "unused.npz")


# ----------------------------------------------------------------------------------------------
# Damaged calibration data (for the valid classifier), Python API


@st.composite
def damaged_calibration(draw) -> tuple[dict, tuple | None]:
    """(array recipe, byte damage to the written .npz or None)."""
    return draw(calibration_arrays()), draw(st.one_of(st.none(), st.none(), byte_mutations()))


def _write_damaged_calibration(folder: Path, case: tuple[dict, tuple | None]) -> Path:
    recipe, raw = case
    path = write_calibration(folder / "data.npz", build_calibration(recipe))
    if raw is not None:
        path.write_bytes(apply_bytes(path.read_bytes(), raw))
    return path


@fuzz_settings(ci_examples=60)
@given(case=damaged_calibration(), command=st.sampled_from(["quantize", "profile"]))
def test_library_on_damaged_calibration(case, command):
    from onnxforge.pipeline.quantize import quantize
    from onnxforge.targets.profile import profile

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp)
        model = folder / "model.onnx"
        model.write_bytes(BASE_MODELS["classifier"]().SerializeToString())
        data = _write_damaged_calibration(folder, case)
        output = folder / "out.onnx"
        digests = (_digest(model), _digest(data))
        try:
            if command == "quantize":
                quantize(model, output, data, _quick_quantize_config())
            else:
                profile(model, _quick_profile_config(sample_data=data))
        except QualityGateError:
            assert output.exists()
        except OnnxForgeError:
            assert not output.exists()
        assert (_digest(model), _digest(data)) == digests
        assert not list(folder.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# The same through the command line: exit codes and stderr


@contextlib.contextmanager
def _native_stderr() -> io.StringIO:
    """What native code (onnxruntime's logger, onnxsim's C++) writes to file descriptor 2, which
    Python-level redirection does not see; the text is in the yielded buffer afterwards."""
    text = io.StringIO()
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text.write(capture.read().decode("utf-8", "replace"))


def _run_cli(args: list) -> tuple[int, str]:
    """main(ARGS) in-process; returns (exit code, everything written to stderr, native output first)."""
    from onnxforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with _native_stderr() as native, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, native.getvalue() + err.getvalue()


def _assert_clean_exit(code: int, err: str, args: list) -> None:
    assert code in (0, 2, 3, 4), f"exit {code} for {args}:\n{err}"
    assert "Traceback" not in err, err
    if code:
        lines = [line for line in without_progress(err).splitlines() if line.strip()]  # after what ran
        assert lines and lines[0].startswith("error:"), err
        assert len(lines) <= 2, f"more than an error line and a hint:\n{err}"


def _cli_args(command: str, model: Path, folder: Path, data: Path) -> list:
    output = folder / "out.onnx"
    return {
        "inspect": ["inspect", model],
        "simplify": ["simplify", model, "-o", output, "--method", "ort"],
        "quantize": [
            "quantize",
            model,
            "-o",
            output,
            "--calibration",
            data,
            "--max-samples",
            "8",
            "--no-mixed-precision",
        ],
        "profile": ["profile", model, "--min-seconds", "0"],
        "profile-data": ["profile", model, "--min-seconds", "0", "--data", data],
    }[command]


@fuzz_settings(ci_examples=60)
@given(case=damaged_models(), command=st.sampled_from(["inspect", "simplify", "quantize", "profile"]))
def test_cli_on_damaged_models(case, command):
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp)
        data = _valid_calibration(folder)
        model = folder / "model.onnx"
        model.write_bytes(build_model_bytes(case))
        digest = _digest(model)
        args = _cli_args(command, model, folder, data)
        code, err = _run_cli(args)
        _assert_clean_exit(code, err, args)
        assert _digest(model) == digest
        if code == 2 and command in ("simplify", "quantize"):
            assert not (folder / "out.onnx").exists()
        assert not list(folder.glob(".*.tmp"))


@fuzz_settings(ci_examples=40)
@given(case=damaged_calibration(), command=st.sampled_from(["quantize", "profile-data"]))
def test_cli_on_damaged_calibration(case, command):
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp)
        model = folder / "model.onnx"
        model.write_bytes(BASE_MODELS["classifier"]().SerializeToString())
        data = _write_damaged_calibration(folder, case)
        digests = (_digest(model), _digest(data))
        args = _cli_args(command, model, folder, data)
        code, err = _run_cli(args)
        _assert_clean_exit(code, err, args)
        if code == 2:
            assert data.name in err, f"the message should name the data file:\n{err}"
            assert not (folder / "out.onnx").exists()
        assert (_digest(model), _digest(data)) == digests


# ----------------------------------------------------------------------------------------------
# The crashes fuzzing found, pinned as plain regression tests (each was an exit 1 before its fix)


def _classifier_with(mutations: list[tuple]) -> bytes:
    return build_model_bytes(("classifier", mutations, None))


@pytest.mark.parametrize(
    ("case", "command", "fragment"),
    [
        # onnx.checker raised UnicodeDecodeError on a name with invalid UTF-8 (model_io.load_model)
        (("classifier", [], ("flip", [(0.0016, 0x80)])), "inspect", "UnicodeDecodeError"),
        # a graph without outputs loaded, then onnxruntime refused to run it (model_io.load_model)
        (("classifier", [("drop_outputs", None)], None), "profile", "no outputs"),
        # a negative declared dim reached numpy as a shape (model_io.load_model)
        (("classifier", [("input_dim", 1, -7)], None), "profile", "-7"),
        # a huge declared dim made profile allocate 256 GiB (targets/feeds.generate_feeds)
        (("foldable", [("input_dim", 0, 2**31 - 1)], None), "profile", "cannot be generated"),
        # a model that loads but fails on every run: onnxruntime's Fail escaped (targets/base.Target.session)
        (("classifier", [("input_dim", 1, 0)], None), "profile", "onnxruntime failed running it"),
        # onnxruntime rejects the model (opset 99 for ai.onnx.ml): simplify said "input kept", exit 0, and
        # onnxsim printed tracebacks on fd 2 (pipeline/simplify._check_runs)
        (("foldable", [("extra_opset", "ai.onnx.ml", 99)], None), "simplify", "onnxruntime cannot load it"),
        # an external-data location with invalid UTF-8 came back as bytes: Path / bytes (model_io)
        (("foldable", [("external_data", "missing.bin")], ("flip", [(0.2265625, 128)])), "inspect", "is missing"),
    ],
)
def test_fuzz_findings_are_clean_errors(tmp_path, case, command, fragment):
    model = tmp_path / "model.onnx"
    model.write_bytes(build_model_bytes(case))
    args = _cli_args(command, model, tmp_path, tmp_path / "unused.npz")
    code, err = _run_cli(args)
    assert code == 2, err
    _assert_clean_exit(code, err, args)
    assert fragment in err
    if fragment != "cannot be generated":  # generate_feeds names the input, not the file
        assert "model.onnx" in err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [("label-scalar", "'label' must be an array"),  # len() of a 0-d array: TypeError
     ("label-bytes", "'label' must be an array")],  # int(b'cat') in evaluate.score was a ValueError
)
def test_bad_labels_are_clean_errors(tmp_path, extra, fragment):
    model = tmp_path / "model.onnx"
    model.write_bytes(BASE_MODELS["classifier"]().SerializeToString())
    recipe = {"samples": 8, "dtype": "float32", "shape": "ok", "poison": None, "key": "x", "extra": extra}
    data = write_calibration(tmp_path / "data.npz", build_calibration(recipe))
    for command in ("quantize", "profile-data"):
        args = _cli_args(command, model, tmp_path, data)
        code, err = _run_cli(args)
        assert code == 2, err
        _assert_clean_exit(code, err, args)
        assert fragment in err and "data.npz" in err


def test_whole_number_float_labels_still_work(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(BASE_MODELS["classifier"]().SerializeToString())
    arrays = build_calibration({"samples": 8, "dtype": "float32", "shape": "ok", "poison": None, "key": "x",
                                "extra": None})
    arrays["label"] = np.array([0, 1, 2, 3, 4, 0, 1, 2], dtype=np.float32)
    data = write_calibration(tmp_path / "data.npz", arrays)
    code, err = _run_cli(_cli_args("profile-data", model, tmp_path, data))
    assert code == 0, err
