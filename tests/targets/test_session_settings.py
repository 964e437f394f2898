"""Session settings beside the model: written only when measured faster twice, applied by profile and
the Python API, and a broken file is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import random_images, run_model

import onnxforge
from onnxforge.errors import OutputPathError, UsageError
from onnxforge.pipeline.reference import Reference
from onnxforge.pipeline.session_tuning import CONTROL, MIN_GAIN, tune_session, tune_session_file
from onnxforge.targets.base import Target
from onnxforge.targets.profile import ProfileConfig, profile
from onnxforge.targets.session_settings import (
    GraphLevel,
    SessionSettings,
    read_settings,
    settings_path,
    write_settings,
)

TUNED = SessionSettings(graph_optimization=GraphLevel.BASIC, intra_op_threads=1, nchwc=False, mem_pattern=False,
                        cpu_mem_arena=False)


def _assert_tuned(options: ort.SessionOptions) -> None:
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.intra_op_num_threads == 1
    assert options.enable_mem_pattern is False
    assert options.enable_cpu_mem_arena is False
    assert options.get_session_config_entry("optimization.disable_specified_optimizers") == "NchwcTransformer"


def test_sidecar_name_and_round_trip(classifier_path):
    path = write_settings(classifier_path, TUNED, {"speedup": 1.2})
    assert path == classifier_path.with_name("classifier.session.json") == settings_path(classifier_path)
    assert read_settings(path) == TUNED
    assert json.loads(path.read_text())["settings"]["graph_optimization"] == "basic"


def test_api_applies_the_settings(classifier_path, feeds):
    write_settings(classifier_path, TUNED, {})
    _assert_tuned(onnxforge.session_options(classifier_path))
    session = onnxforge.InferenceSession(classifier_path)
    _assert_tuned(session.get_session_options())
    for ours, plain in zip(session.run(None, feeds), run_model(classifier_path, feeds), strict=True):
        np.testing.assert_allclose(ours, plain, rtol=1e-4, atol=1e-5)


def test_without_a_sidecar_the_defaults_apply(classifier_path):
    options = onnxforge.InferenceSession(classifier_path).get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_mem_pattern and options.enable_cpu_mem_arena


def _capture_sessions(monkeypatch) -> list[ort.SessionOptions]:
    built: list[ort.SessionOptions] = []
    original = Target.session

    def session(self, model, **kwargs):
        made = original(self, model, **kwargs)
        built.append(made.get_session_options())
        return made

    monkeypatch.setattr(Target, "session", session)
    return built


def test_profile_uses_the_sidecar(classifier_path, monkeypatch):
    write_settings(classifier_path, TUNED, {})
    built = _capture_sessions(monkeypatch)
    result = profile(classifier_path, ProfileConfig(min_seconds=0.0, min_runs=3, warmup=1))
    assert len(built) == 1
    _assert_tuned(built[0])
    assert result.session_settings == TUNED.changes()
    assert result.to_json()["session_settings"]["graph_optimization"] == "basic"


def test_profile_threads_flag_wins_over_the_sidecar(classifier_path, monkeypatch):
    write_settings(classifier_path, TUNED, {})
    built = _capture_sessions(monkeypatch)
    profile(classifier_path, ProfileConfig(min_seconds=0.0, min_runs=3, warmup=1, threads=(2,)))
    assert built[0].intra_op_num_threads == 2
    assert built[0].graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def test_profile_compare_runs_each_model_with_its_own_settings(classifier_path, tmp_path, monkeypatch):
    import shutil

    other = tmp_path / "other.onnx"
    shutil.copyfile(classifier_path, other)
    write_settings(other, SessionSettings(mem_pattern=False), {})
    built = _capture_sessions(monkeypatch)
    profile(classifier_path, ProfileConfig(min_seconds=0.0, min_runs=3, warmup=1, compare=other))
    model_options, other_options = built[-2:]
    assert model_options.enable_mem_pattern and not other_options.enable_mem_pattern


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ('{"format": "onnxforge-session/1", "settings": {"graph_optimization": "fastest"}}', "'fastest' is not one of"),
    ('{"format": "onnxforge-session/1", "settings": {"threads": 2}}', "unknown key 'threads'"),
    ('{"format": "onnxforge-session/1", "settings": {"intra_op_threads": 0}}', "at least 1"),
    ('{"settings": {}}', "not an onnxforge session settings file"),
])
def test_invalid_sidecar_is_one_line_error(classifier_path, cli, text, words):
    settings_path(classifier_path).write_text(text)
    with pytest.raises(UsageError, match=words):
        onnxforge.session_options(classifier_path)
    code, _out, err = cli("profile", classifier_path, "--min-seconds", "0")
    assert code == 2
    assert "Traceback" not in err
    assert words in err and "classifier.session.json" in err


def _fake(speedups: list[dict[str, float]]):
    """A measure answering each interleaved run from ``speedups`` in turn (1.0 for a label not given)."""
    calls: list[list[str]] = []

    def measure(candidates):
        answer = speedups[len(calls)] if len(calls) < len(speedups) else {}
        calls.append(list(candidates))
        return {label: answer.get(label, 1.0) for label in candidates}

    return measure, calls


def test_faster_once_is_not_written(classifier_path):
    measure, calls = _fake([{"graph basic": 1.5, "no arena": 1.02}, {"graph basic": 1.01}])
    tuning = tune_session_file(classifier_path, measure=measure)
    assert calls[1] == ["graph basic", CONTROL]  # only the promising setting is measured again, beside the control
    assert not tuning.improved and tuning.written is None
    assert not settings_path(classifier_path).exists()
    assert "defaults kept" in tuning.summary()


def test_faster_twice_is_written_and_applied(classifier_path):
    measure, _ = _fake([{"no arena": 1.2}, {"no arena": 1.1}])
    tuning = tune_session_file(classifier_path, measure=measure)
    assert tuning.written == str(settings_path(classifier_path))
    assert read_settings(tuning.written) == SessionSettings(cpu_mem_arena=False)
    assert tuning.speedup == pytest.approx(1.1)
    assert onnxforge.session_options(classifier_path).enable_cpu_mem_arena is False


def test_a_gain_within_the_control_noise_is_not_kept(classifier_path):
    # the A/A control (the defaults timed against themselves) ran 1.10x: this run's noise is 10%, so the bar
    # is 1.20x; 1.15x twice is not kept, 1.25x twice is
    noisy = {CONTROL: 1.10, "no arena": 1.15}
    tuning = tune_session_file(classifier_path, measure=_fake([noisy, noisy])[0])
    assert not tuning.improved and tuning.controls == (1.10,)
    assert "faster by more than 20% twice (twice the defaults' own noise, 10%)" in tuning.summary()
    clear = {CONTROL: 1.10, "no arena": 1.25}
    tuning = tune_session_file(classifier_path, measure=_fake([clear, clear])[0])
    assert tuning.chosen == SessionSettings(cpu_mem_arena=False) and tuning.controls == (1.10, 1.10)


def test_combination_kept_only_when_it_beats_the_best_single(classifier_path):
    first = {"no arena": 1.2, "graph extended": 1.3}
    measure, _ = _fake([first, first, {"combined": 1.5}, {"combined": 1.4}])
    assert tune_session_file(classifier_path, measure=measure).chosen == SessionSettings(
        cpu_mem_arena=False, graph_optimization=GraphLevel.EXTENDED)
    measure, _ = _fake([first, first, {"combined": 1.5}, {"combined": 1.25}])
    assert tune_session_file(classifier_path, measure=measure).chosen == SessionSettings(
        graph_optimization=GraphLevel.EXTENDED)


def test_stale_sidecar_removed_and_user_file_kept(classifier_path):
    write_settings(classifier_path, TUNED, {})
    tune_session_file(classifier_path, measure=_fake([])[0])  # nothing faster: our old file goes
    assert not settings_path(classifier_path).exists()
    settings_path(classifier_path).write_text('{"mine": true}')
    with pytest.raises(OutputPathError, match="not written by onnxforge"):
        tune_session_file(classifier_path, measure=_fake([{"no arena": 2.0}, {"no arena": 2.0}])[0])
    assert json.loads(settings_path(classifier_path).read_text()) == {"mine": True}
    tune_session_file(classifier_path, measure=_fake([])[0])  # and a user's file is never removed
    assert settings_path(classifier_path).exists()


def test_thread_candidates_stay_within_the_budget(classifier_path):
    measure, _calls = _fake([])
    tuning = tune_session(Reference(classifier_path, None), threads=2, measure=measure)
    assert [t.label for t in tuning.trials if "thread" in t.label] == ["1 thread"]
    assert tuning.baseline == SessionSettings(intra_op_threads=2)


def test_real_timing_keeps_only_what_held_twice(classifier_path, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=random_images(2))
    tuning = tune_session_file(classifier_path, data, seconds=0.2)
    assert len(tuning.controls) >= 1  # every interleaved run had its A/A control
    for trial in tuning.trials:  # kept: over the bar (at least min_gain) in both runs
        assert not trial.kept or (len(trial.speedups) == 2 and min(trial.speedups) > 1 + MIN_GAIN)
    if tuning.improved:
        assert tuning.speedup == pytest.approx(max(min(t.speedups) for t in tuning.trials if t.kept), abs=1e-3)
    assert settings_path(classifier_path).exists() == tuning.improved
    if tuning.improved:
        assert read_settings(settings_path(classifier_path)) == tuning.chosen
