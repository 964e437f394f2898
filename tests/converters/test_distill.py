"""Distillation of a pruned student against its PyTorch teacher (onnxforge.converters.distill):
the student is the pruned graph's network before training, training improves its held-out metric
over the least-squares repair alone, an ONNX-only source is refused in one line, and an
interrupted training leaves nothing behind; a file.py teacher runs in a child process (the same
result), so its sys.exit(), os._exit() or hang ends in one error line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_model

from onnxforge.converters import ExportConfig, export
from onnxforge.converters.distill import NO_ONNX_BRIDGE, DistillConfig, distill
from onnxforge.converters.source import resolve_source
from onnxforge.converters.student import base_name, build_student
from onnxforge.errors import UsageError
from onnxforge.pipeline.prune.channels import ChannelPruneConfig, prune_channels

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
from test_bad_inputs import one_error_line

TEACHER = f"{Path(__file__).with_name('distill_teacher.py')}:build"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(folder, pruned .onnx, calibration .npz, eval .npz): the tiny teacher exported and 75% of its
    channels pruned and repaired by least squares."""
    folder = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((384, 3, 8, 8)).astype(np.float32))
    np.savez(folder / "eval.npz", x=rng.standard_normal((200, 3, 8, 8)).astype(np.float32))
    export(TEACHER, folder / "teacher.onnx", ExportConfig(dynamic_batch=True), in_process=True)
    prune_channels(folder / "teacher.onnx", folder / "pruned.onnx",
                   ChannelPruneConfig(ratio=0.75, round_to=1, calibration_data=folder / "calib.npz",
                                      gate=False))  # keep the damage: no back-off
    return folder, folder / "pruned.onnx", folder / "calib.npz", folder / "eval.npz"


def test_the_student_is_the_pruned_graph_before_training(pruned):
    _, path, calib, _ = pruned
    graph = onnx.load(path)
    student = build_student(resolve_source(TEACHER).model, graph, {"x": torch.zeros(2, 3, 8, 8)})
    state = student.module.state_dict()
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    # every parameter is an initializer of the graph, by name, with its shape and values
    assert set(student.mapping) == {n for n, _ in student.module.named_parameters()}
    for key, name in student.mapping.items():
        assert base_name(name) in (key, key.replace(".bias", ".weight_bias"))
        assert tuple(state[key].shape) == initializers[name].shape
        np.testing.assert_array_equal(state[key].numpy(), initializers[name])
    assert student.module.conv1.weight.shape[0] == 4  # 16 channels, 75% pruned
    assert student.fused == ["conv1+bn1", "conv2+bn2"]  # the graph folded both BatchNorms
    x = np.load(calib)["x"][:32]
    with torch.no_grad():
        ours = student.module(x=torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, run_model(path, {"x": x})[0], atol=1e-5, rtol=1e-4)


def test_distillation_beats_the_repair_alone_on_held_out_data(pruned):
    folder, path, calib, evaluation = pruned
    messages = []
    result = distill(TEACHER, path, folder / "distilled.onnx",
                     DistillConfig(epochs=25, learning_rate=3e-3, calibration_data=calib, eval_data=evaluation,
                                   tolerance=100.0, feature_weight=0.5),
                     progress=lambda event: messages.append(event.describe()))
    assert result.parity_before["max_abs_error"] < 1e-4  # the untrained student was the pruned graph
    assert result.verified and result.parity_after["max_abs_error"] < 1e-4
    assert result.loss == "kl" and result.held_out_metric == "agreement"
    assert result.held_out_after > result.held_out_before
    assert result.scores["distilled"] > result.scores["repair_only"] + 0.02  # on eval data never trained on
    assert any("epoch 1/25" in m and "held-out agreement" in m for m in messages)
    # the per-epoch history the run report draws: epoch 0 is the untrained student
    assert [h["epoch"] for h in result.history] == list(range(result.epochs_run + 1))
    seconds = [h["seconds"] for h in result.history]
    assert seconds[0] == 0.0 and seconds == sorted(seconds) and seconds[-1] <= result.train_seconds + 1e-3
    assert result.history[0]["loss"] is None and all(h["loss"] > 0 for h in result.history[1:])
    saved = onnx.load(folder / "distilled.onnx")
    assert [o.name for o in saved.graph.output] == [o.name for o in onnx.load(path).graph.output]
    x = np.load(evaluation)["x"][:8]
    assert run_model(folder / "distilled.onnx", {"x": x})[0].shape == (8, 5)


def test_training_is_deterministic_in_this_process_or_the_child(pruned):
    """A file.py teacher trains in a child process; the seeded result is the one this process gets
    (the same held-out losses and weights; the files' bytes differ between any two dynamo exports)."""
    folder, path, calib, _ = pruned
    config = DistillConfig(epochs=2, calibration_data=calib)
    a = distill(TEACHER, path, folder / "a.onnx", config, in_process=True)
    b = distill(TEACHER, path, folder / "b.onnx", config)
    assert b.path == folder / "b.onnx"
    assert [h["held_out_loss"] for h in a.history] == [h["held_out_loss"] for h in b.history]
    weights = [{i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(folder / f).graph.initializer}
               for f in ("a.onnx", "b.onnx")]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        np.testing.assert_array_equal(value, weights[1][name])


def test_an_onnx_only_source_is_refused_in_one_line(pruned, tmp_path):
    folder, path, calib, _ = pruned
    with pytest.raises(UsageError) as info:
        distill(folder / "teacher.onnx", path, tmp_path / "out.onnx", DistillConfig(calibration_data=calib))
    assert info.value.message == NO_ONNX_BRIDGE and "\n" not in info.value.message
    assert "onnx2torch" in info.value.message and "least-squares repair is kept" in info.value.message
    assert not (tmp_path / "out.onnx").exists()


def test_an_interrupted_training_leaves_nothing_half_written(pruned, tmp_path):
    _, path, calib, _ = pruned

    def interrupt(event) -> None:
        if "epoch 2/" in event.describe():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(TEACHER, path, tmp_path / "out.onnx", DistillConfig(epochs=5, calibration_data=calib),
                progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_a_graph_from_another_model_is_refused_in_one_line(pruned, tmp_path):
    _, _, calib, _ = pruned
    other = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 3, 8, 8] x) => (float[N, 3, 8, 8] y) <float[1] scale = {2.0}> { y = Mul(x, scale) }
    """)
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(UsageError, match="no initializer of the pruned graph is named after a parameter"):
        distill(TEACHER, tmp_path / "other.onnx", tmp_path / "out.onnx", DistillConfig(calibration_data=calib))
    assert not (tmp_path / "out.onnx").exists()


def test_prune_with_distill_on_the_command_line(pruned, cli, tmp_path):
    folder, _, calib, evaluation = pruned
    out = tmp_path / "student.onnx"
    code, stdout, _ = cli("prune", folder / "teacher.onnx", "-o", out, "--method", "channels", "--ratio", "0.75",
                          "--calibration", calib, "--distill", TEACHER, "--epochs", "2", "--eval", evaluation,
                          "--tolerance", "100")
    assert code == 0, (stdout, _)
    assert "distilled 2 epochs" in stdout and "repair only" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]  # the pruned intermediate is gone
    code, _, stderr = cli("prune", folder / "teacher.onnx", "-o", tmp_path / "x.onnx", "--method", "channels",
                          "--distill", TEACHER)
    assert code == 2 and "--distill trains on the --calibration data" in stderr


# ----------------------------------------------------------------------------------------------
# A file.py teacher is the user's code: distillation runs it in a child process (as export does),
# so its sys.exit()/os._exit()/hang ends in one error line (exit 2), its prints stay off --json -,
# and nothing is left behind: no output, no staging or temp folder, no process.

TEACHER_VARIANTS = Path(__file__).with_name("distill_teacher.py").read_text() + textwrap.dedent(
    """

    import os
    import sys
    import time


    def exits_0():
        sys.exit(0)


    def hard_exit_0():
        os._exit(0)


    def hangs():
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)


    def prints():
        print("hello from the teacher")
        return build()
    """
)


@pytest.fixture
def prune_distill(pruned, tmp_path, monkeypatch, capfd):
    """``onnxforge prune --distill teacher.py:NAME ...`` in this process, its temp folders in ``tmp``:
    (exit code, stdout, stderr, output path); asserts that nothing but the output was left behind."""
    from onnxforge import _scratch
    from onnxforge.cli import main

    folder, _, calib, _ = pruned
    teacher = tmp_path / "teacher.py"
    teacher.write_text(TEACHER_VARIANTS)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(_scratch, "scratch_folder", contextlib.nullcontext)  # so ours are seen, not swept up
    out = tmp_path / "out" / "student.onnx"
    out.parent.mkdir()

    def invoke(name: str, *extra: str) -> tuple[int, str, str, Path]:
        capfd.readouterr()
        code = main(["prune", str(folder / "teacher.onnx"), "-o", str(out), "--method", "channels", "--ratio", "0.75",
                     "--calibration", str(calib), "--distill", f"{teacher}:{name}", "--epochs", "1", *extra])
        captured = capfd.readouterr()
        assert list(temp.iterdir()) == [], "a temp folder was left behind"
        assert [p.name for p in out.parent.iterdir()] == ([out.name] if code == 0 else []), "a staging folder was left"
        assert teacher.read_text() == TEACHER_VARIANTS
        return code, captured.out, captured.err, out

    return invoke


@pytest.mark.parametrize("name", ["exits_0", "hard_exit_0"])
def test_a_teacher_that_ends_the_process(prune_distill, name):
    code, _, err, _ = prune_distill(name)
    assert code == 2, err
    one_error_line(err, f"teacher.py:{name}", "the model source exited with code 0 before the distillation finished")


def test_a_teacher_that_hangs_is_stopped_at_the_timeout(prune_distill, tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("PID_FILE", str(pid_file))
    code, _, err, _ = prune_distill("hangs", "--timeout", "8")
    assert code == 2, err
    one_error_line(err, "teacher.py:hangs", "did not finish within 8 s")
    if pid_file.exists():  # the child got as far as the teacher's code: it must be gone now
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_what_a_teacher_prints_stays_off_json_stdout(prune_distill):
    code, stdout, err, out = prune_distill("prints", "--json", "-")
    assert code == 0, err
    assert json.loads(stdout)["distill"]["epochs_run"] == 1  # stdout is nothing but the JSON
    assert "hello from the teacher" in err
    assert out.is_file()


def test_a_search_trial_records_a_teacher_that_exits(pruned, tmp_path):
    """optimize's distill trials run the same stage: the trial fails with the reason, the search goes on."""
    from onnxforge.model_io import file_sha256
    from onnxforge.pipeline.data_spec import DataSpec
    from onnxforge.pipeline.evaluate import Metric, QualityGate
    from onnxforge.pipeline.runner import source_fingerprint
    from onnxforge.pipeline.search.space import TrialPlan
    from onnxforge.pipeline.search.trial import TrialContext, evaluate_plan

    folder, _, calib, evaluation = pruned
    teacher = tmp_path / "teacher.py"
    teacher.write_text(TEACHER_VARIANTS)
    start = folder / "teacher.onnx"
    ctx = TrialContext(start_model=str(start), start_sha256=file_sha256(start), reference_model=str(start),
                       calibration=DataSpec(path=calib), eval_path=str(evaluation), target="cpu",
                       gate=QualityGate(metric=Metric.AGREEMENT, tolerance=100.0), reference_score=1.0, batch=1,
                       threads=1, rounds=3, cache_root=str(tmp_path / "cache"),
                       source=f"{teacher}:exits_0", source_sha256=source_fingerprint(f"{teacher}:exits_0"))
    plan = TrialPlan({"structure": "prune_channels", "recovery": "distill"},
                     (("prune_channels", {"ratio": 0.75}), ("distill", {"epochs": 1})))
    record = evaluate_plan(0, plan, ctx, tmp_path / "trial.onnx", timing=False)
    assert record["status"] == "failed"
    assert "teacher.py:exits_0: the model source exited with code 0" in record["error"]


def test_a_time_budget_must_fit_in_the_timeout():
    with pytest.raises(UsageError, match="a time budget of 3600 s does not fit in the timeout of 1800 s"):
        DistillConfig(time_budget_s=3600)
    assert DistillConfig(time_budget_s=3600, timeout_s=4000).timeout_s == 4000
    from onnxforge.pipeline import codec

    assert "timeout_s" not in {f.name for f in codec.key_fields(DistillConfig)}  # a longer wait is the same model
