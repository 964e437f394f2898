"""Resuming ``optimize`` from a run folder's ``study.log``: what it holds is checked before it is
trusted. A trial record naming a file outside the run folder never gets that file deleted; a line
cut mid-write is dropped with a warning; a garbage file is a clear error; paths are relative to the
run folder, so a run resumes from any working folder; an interrupted trial does not use up --trials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_optimize import _config, project  # noqa: F401 - the fixture

from onnxforge.pipeline.search import optimize


def _interrupt_at(number: int):
    def progress(event):
        if event.message.startswith(f"trial {number}:"):
            raise KeyboardInterrupt  # Ctrl-C while this trial is being built
    return progress


def _add_record(run: Path, record: dict) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(run / "study.log")))
    study = optuna.load_study(study_name="onnxforge", storage=storage)
    study.add_trial(optuna.trial.create_trial(values=[0.9, 1e12], user_attrs={"record": record}))


def test_a_record_naming_a_file_outside_the_run_folder_never_deletes_it(project):
    run = project / "run"
    first = optimize(project / "model.onnx", run, _config(project))
    precious = project / "precious.onnx"
    precious.write_bytes(b"a user's model")
    forged = {**first.trials[0], "number": 99, "sha256": "f" * 64, "bytes": 10**12, "loss": 0.9,
              "within_budget": False, "path": str(precious)}
    _add_record(run, forged)
    optimize(project / "model.onnx", run, _config(project))
    assert precious.read_bytes() == b"a user's model"


def _refused(project: Path, run: Path) -> str:
    from onnxforge.errors import UsageError

    with pytest.raises(UsageError) as raised:  # the CLI prints it as one line, exit 2
        optimize(project / "model.onnx", run, _config(project))
    assert raised.value.exit_code == 2 and "\n" not in raised.value.message
    return raised.value.message


def test_a_record_that_does_not_fit_the_schema_is_a_clear_error(project):
    run = project / "run"
    first = optimize(project / "model.onnx", run, _config(project))
    _add_record(run, {**first.trials[0], "number": "seven"})
    before = (run / "study.log").read_bytes()
    assert "study.log" in _refused(project, run)
    assert (run / "study.log").read_bytes() == before


def test_a_line_cut_mid_write_is_dropped_with_a_warning(project):
    run = project / "run"
    with pytest.raises(KeyboardInterrupt):
        optimize(project / "model.onnx", run, _config(project), progress=_interrupt_at(2))
    with open(run / "study.log", "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 2, "us')  # the power went out here
    result = optimize(project / "model.onnx", run, _config(project))
    assert any("cut mid-write" in n for n in result.notes)
    assert {r["plan"].get("prune_channels.ratio") for r in result.trials} == {None, 0.5, 0.75}
    for line in (run / "study.log").read_bytes().splitlines():  # what it appended is readable again
        json.loads(line)
    optimize(project / "model.onnx", run, _config(project))  # and a third run reads it


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00garbage\n", b"not json\n{}\n", b"{\"a\": 1}\n[1, 2\n"])
def test_a_garbage_study_file_is_a_clear_error_and_is_left_alone(project, garbage):
    run = project / "run"
    optimize(project / "model.onnx", run, _config(project))
    (run / "study.log").write_bytes(garbage)
    assert "study.log" in _refused(project, run)
    assert (run / "study.log").read_bytes() == garbage


def test_a_run_resumes_from_another_working_folder(project, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(KeyboardInterrupt):
        optimize("model.onnx", "run", _config(project), progress=_interrupt_at(2))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    result = optimize(project / "model.onnx", project / "run", _config(project))
    assert result.best is not None and result.best["plan"]["prune_channels.ratio"] == 0.5
    assert {r["number"] for r in result.front} & {0, 1}  # the first run's trials are on the front
    for r in result.trials:
        assert r.get("path") is None or not Path(r["path"]).is_absolute()


def test_an_interrupted_trial_does_not_count_against_trials(project):
    run = project / "run"
    with pytest.raises(KeyboardInterrupt):
        optimize(project / "model.onnx", run, _config(project, trials=3), progress=_interrupt_at(2))
    result = optimize(project / "model.onnx", run, _config(project, trials=3))
    assert [r["number"] for r in result.trials] == [0, 1, 3]
