"""Distillation of a pruned student against its PyTorch teacher (onnxforge.converters.distill):
the student is the pruned graph's network before training, training improves its held-out metric
over the least-squares repair alone, an ONNX-only source is refused in one line, and an
interrupted training leaves nothing behind."""

from __future__ import annotations

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
                   ChannelPruneConfig(ratio=0.75, calibration_data=folder / "calib.npz",
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
                     progress=messages.append)
    assert result.parity_before["max_abs_error"] < 1e-4  # the untrained student was the pruned graph
    assert result.verified and result.parity_after["max_abs_error"] < 1e-4
    assert result.loss == "kl" and result.held_out_metric == "agreement"
    assert result.held_out_after > result.held_out_before
    assert result.scores["distilled"] > result.scores["repair_only"] + 0.02  # on eval data never trained on
    assert any("epoch 1/25" in m and "held-out agreement" in m for m in messages)
    saved = onnx.load(folder / "distilled.onnx")
    assert [o.name for o in saved.graph.output] == [o.name for o in onnx.load(path).graph.output]
    x = np.load(evaluation)["x"][:8]
    assert run_model(folder / "distilled.onnx", {"x": x})[0].shape == (8, 5)


def test_training_is_deterministic(pruned):
    folder, path, calib, _ = pruned
    config = DistillConfig(epochs=2, calibration_data=calib)
    a = distill(TEACHER, path, folder / "a.onnx", config)
    b = distill(TEACHER, path, folder / "b.onnx", config)
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

    def interrupt(message: str) -> None:
        if "epoch 2/" in message:
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
