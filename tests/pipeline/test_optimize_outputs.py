"""Where ``optimize`` writes: never over one of its inputs, never into a folder of someone else's files,
never deleting a file it did not create. Each refusal is exit 2 with one line, and the user's files
are byte-identical afterwards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_optimize import _config, project  # noqa: F401 - the fixture

from onnxforge.pipeline.search import optimize

FLAGS = ["--pass", "prune_channels", "--trials", "1", "--space", "prune_channels.ratio=0.5",
         "--space", "prune_channels.importance=l2", "--objective", "size", "--max-drop", "100"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(cli, *args) -> str:
    code, _, err = cli("optimize", *args, *FLAGS)
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return err


def test_a_run_folder_holding_the_inputs_is_refused(project, cli):
    proj = project / "proj"
    (proj / "front").mkdir(parents=True)
    shutil.copyfile(project / "model.onnx", proj / "best.onnx")
    shutil.copyfile(project / "calib.npz", proj / "front" / "calib.npz")
    (proj / "front" / "notes.txt").write_text("my notes")
    before = _snapshot(proj)
    err = _refused(cli, proj / "best.onnx", "-o", proj, "--calibration", proj / "front" / "calib.npz",
                   "--eval", project / "eval.npz")
    assert "input" in err
    assert _snapshot(proj) == before


def test_json_naming_an_input_is_refused(project, cli):
    before = (project / "model.onnx").read_bytes()
    err = _refused(cli, project / "model.onnx", "-o", project / "run", "--calibration", project / "calib.npz",
                   "--eval", project / "eval.npz", "--json", project / "model.onnx")
    assert "--json" in err or "model.onnx" in err
    assert (project / "model.onnx").read_bytes() == before


def test_a_folder_of_someone_elses_files_is_refused(project, cli):
    mine = project / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "front").mkdir()
    (mine / "front" / "keep.onnx").write_bytes(b"mine")
    before = _snapshot(mine)
    err = _refused(cli, project / "model.onnx", "-o", mine, "--calibration", project / "calib.npz",
                   "--eval", project / "eval.npz")
    assert "notes.txt" in err or "front" in err
    assert _snapshot(mine) == before


def test_its_own_previous_run_continues_and_keeps_a_users_files(project):
    run = project / "run"
    optimize(project / "model.onnx", run, _config(project))
    (run / "front" / "notes.txt").write_text("why trial 1 won")
    (run / "NOTES.md").write_text("my notes")
    optimize(project / "model.onnx", run, _config(project))
    assert (run / "front" / "notes.txt").read_text() == "why trial 1 won"
    assert (run / "NOTES.md").read_text() == "my notes"


def test_the_library_refuses_a_run_folder_holding_its_model(project):
    from onnxforge.errors import UsageError

    with pytest.raises(UsageError, match="input"):
        optimize(project / "model.onnx", project, _config(project))


def test_a_symlink_in_its_own_run_folder_is_replaced_not_written_through(project):
    run = project / "run"
    first = optimize(project / "model.onnx", run, _config(project))
    precious = project / "precious.onnx"
    precious.write_bytes(b"a user's model")
    (run / "best.onnx").unlink()
    (run / "best.onnx").symlink_to(precious)
    front = run / first.front[0]["front_path"]
    front.unlink()
    front.symlink_to(precious)
    optimize(project / "model.onnx", run, _config(project))
    assert precious.read_bytes() == b"a user's model"
    assert not (run / "best.onnx").is_symlink() and (run / "best.onnx").stat().st_size > 100


def test_a_symlink_planted_where_a_trial_is_kept_is_replaced_not_written_through(project):
    run = project / "run"

    def interrupt_trial_2(event):
        if event.message.startswith("trial 2:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(project / "model.onnx", run, _config(project), progress=interrupt_trial_2)
    precious = project / "precious.onnx"
    precious.write_bytes(b"a user's model")
    (run / "trials" / "0003.onnx").symlink_to(precious)  # trial 2 runs again as trial 3
    optimize(project / "model.onnx", run, _config(project))
    assert precious.read_bytes() == b"a user's model"
