"""``tune_session`` through the one door: a command's ``--tune-session`` and a recipe's ``tune_session: true``
write the final model's measured session options beside it; without it nothing is written."""

from __future__ import annotations

import json

import pytest
from conftest import latency_stats
from test_optimize import project  # noqa: F401 - the fixture

from onnxforge.pipeline.session_tuning import CONTROL
from onnxforge.targets.session_settings import GraphLevel, read_settings, settings_path


@pytest.fixture
def int8_faster(monkeypatch):
    """conftest's int8_faster, with session tuning's A/A control timed like the reference (no noise): every
    other model or setting runs in 0.5 ms against 1 ms."""
    from onnxforge.pipeline import reference

    def timed(sessions, feeds, rounds=20, **_):
        first = next(iter(sessions))  # time_against puts the reference first
        return {label: latency_stats(1.0 if label in (first, CONTROL) else 0.5) for label in sessions}

    monkeypatch.setattr(reference, "compare_latency", timed)


def test_quantize_tune_session_writes_beside_the_output(tmp_path, classifier_path, calibration_npz, cli,
                                                        int8_faster):
    # int8_faster answers every interleaved timing 2x faster than the reference: every setting holds twice,
    # the combination does not beat the best single one, so the first setting tried is chosen
    out = tmp_path / "q.onnx"
    code, _, err = cli("quantize", classifier_path, "-o", out, "--calibration", calibration_npz, "--tune-session",
                       "--no-cache", "--json", tmp_path / "q.json")
    assert code == 0, err
    code, text, err = cli("quantize", classifier_path, "-o", out, "--calibration", calibration_npz, "--tune-session")
    assert code == 0, err
    assert "session: graph_optimization=basic: 2.00x the defaults' speed (confirmed twice); wrote q.session.json" \
        in text
    assert read_settings(settings_path(out)).graph_optimization is GraphLevel.BASIC
    session = json.loads((tmp_path / "q.json").read_text())["session"]
    assert session["chosen"] == {"graph_optimization": "basic"} and session["written"] == str(settings_path(out))
    assert not settings_path(classifier_path).exists()  # the input is never touched
    code, out_text, err = cli("profile", out, "--min-seconds", "0")
    assert code == 0, err
    assert "graph_optimization=basic" in out_text


def test_without_the_flag_nothing_is_written(tmp_path, classifier_path, calibration_npz, cli, int8_faster):
    out = tmp_path / "q.onnx"
    code, _, err = cli("quantize", classifier_path, "-o", out, "--calibration", calibration_npz, "--no-cache")
    assert code == 0, err
    assert not settings_path(out).exists()


def test_recipe_tunes_the_last_stage(tmp_path, classifier_path, int8_faster):
    from onnxforge.pipeline.recipe import load_recipe
    from onnxforge.pipeline.runner import run_recipe

    (tmp_path / "recipe.yaml").write_text(
        f"model: {classifier_path}\ntune_session: true\nstages:\n  - simplify\n")
    result = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run")
    last = result.run_dir / result.manifest.stages[-1].output_file()["path"]
    assert settings_path(last).is_file()
    assert read_settings(settings_path(last)).graph_optimization is GraphLevel.BASIC
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["stages"][-1]["result"]["session"]["chosen"] == {"graph_optimization": "basic"}


def test_optimize_tunes_best(project, cli, int8_faster):
    code, _, err = cli("optimize", project / "model.onnx", "-o", project / "run", "--calibration",
                       project / "calib.npz", "--eval", project / "eval.npz", "--pass", "prune_channels",
                       "--trials", "1", "--space", "prune_channels.ratio=0.5", "--space",
                       "prune_channels.importance=l2", "--objective", "size", "--max-drop", "100", "--tune-session")
    assert code == 0, err
    assert read_settings(settings_path(project / "run" / "best.onnx")).graph_optimization is GraphLevel.BASIC
    manifest = json.loads((project / "run" / "manifest.json").read_text())
    assert manifest["files"]["session"] == "best.session.json"
