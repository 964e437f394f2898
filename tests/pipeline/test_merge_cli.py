"""``onnxforge merge``: what it prints and writes, and its exit codes (0 merged, 2 bad input or options,
4 parity failed with the file kept)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_classifier, random_images, run_model, save, sha256, without_progress, write_npz


@pytest.fixture
def models(tmp_path):
    return [save(make_classifier(seed), tmp_path / f"cnn{seed}.onnx") for seed in (0, 1)]


@pytest.fixture
def eval_images(tmp_path, models):
    images = np.clip(random_images(40, seed=3) * 0.3 + 0.5, 0, 1).astype(np.float32)
    labels = run_model(models[0], {"x": images})[0].argmax(1)
    return write_npz(tmp_path / "eval.npz", x=images, label=labels)


def one_error(err: str, *fragments: str) -> None:
    lines = [line for line in without_progress(err).splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[0].startswith("error:"), err
    assert len(lines) <= 2, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_merge_prints_the_graph_parity_and_accuracy(cli, tmp_path, models, eval_images):
    out, report = tmp_path / "deploy.onnx", tmp_path / "deploy.json"
    code, stdout, err = cli("merge", models[0], "-o", out, "--pre", "image", "--post", "argmax", "--eval", eval_images,
                            "--json", report)
    assert code == 0, err
    assert "merged" in stdout and "image pre (uint8 hwc Nx8x8x3) + network + argmax" in stdout
    assert "input  x: Nx8x8x3 uint8" in stdout and "output label: N int64" in stdout and "parity ok" in stdout
    assert "model alone" in stdout and "100.00%" in stdout
    data = json.loads(report.read_text())
    assert data["verified"] is True and data["accuracy"]["network"] == 1.0
    label, score = run_model(out, {"x": np.zeros((2, 8, 8, 3), np.uint8)})
    assert label.shape == (2,) and score.dtype == np.float32


def test_an_ensemble_reports_every_member(cli, tmp_path, models, eval_images):
    code, stdout, err = cli("merge", *models, "-o", tmp_path / "e.onnx", "--ensemble", "vote", "--eval", eval_images)
    assert code == 0, err
    assert "member cnn0.onnx" in stdout and "member cnn1.onnx" in stdout and "merged ensemble" in stdout


def test_json_to_stdout_is_only_json(cli, tmp_path, models):
    code, stdout, err = cli("merge", models[0], "-o", tmp_path / "m.onnx", "--post", "topk", "--top-k", "2",
                            "--json", "-")
    assert code == 0, err
    assert [o["name"] for o in json.loads(stdout)["outputs"]] == ["labels", "scores"]


@pytest.mark.parametrize(("args", "fragments"), [
    (["--top-k", "3"], ["--top-k applies only with --post topk"]),
    (["--mean", "0.5", "--post", "softmax"], ["--mean applies only with --pre image"]),
    (["--ensemble", "vote"], ["--ensemble applies only with two or more MODELS"]),
    (["--pre", "image", "--tokenizer"], ["--pre and --tokenizer"]),
    (["--pre", "image", "--size", "8by8"], ["--size '8by8'"]),
    (["--post", "topk", "--top-k", "7"], ["only 5 classes"]),
    (["--pre", "image", "--input", "nope"], ["the model has no input 'nope'"]),
    (["--bogus"], ["No such option"]),
])
def test_options_that_do_not_apply_are_exit_2(cli, tmp_path, models, args, fragments):
    before = sha256(models[0])
    code, _, err = cli("merge", models[0], "-o", tmp_path / "m.onnx", *args)
    assert code == 2
    one_error(err, *fragments)
    assert not (tmp_path / "m.onnx").exists() and sha256(models[0]) == before


def test_an_ensemble_of_models_with_other_inputs_is_exit_2(cli, tmp_path, models):
    other = make_classifier(batch=1)
    other.graph.input[0].name = "image"
    for node in other.graph.node:
        node.input[:] = ["image" if i == "x" else i for i in node.input]
    code, _, err = cli("merge", models[0], save(other, tmp_path / "image.onnx"), "-o", tmp_path / "e.onnx")
    assert code == 2
    one_error(err, "ensemble members take different inputs", "cnn0.onnx takes x", "image.onnx takes image")


def test_a_missing_model_is_exit_2(cli, tmp_path):
    code, _, err = cli("merge", tmp_path / "nope.onnx", "-o", tmp_path / "m.onnx")
    assert code == 2
    one_error(err, "nope.onnx")


def test_json_may_not_overwrite_a_model(cli, tmp_path, models):
    before = sha256(models[1])
    code, _, err = cli("merge", *models, "-o", tmp_path / "e.onnx", "--json", models[1])
    assert code == 2 and sha256(models[1]) == before
    one_error(err, "is an input of this command")


def test_a_parity_failure_is_exit_4_and_keeps_the_file(cli, tmp_path, models, monkeypatch):
    from onnxforge.pipeline.merge.postprocess import PostPlan

    real = PostPlan.reference
    monkeypatch.setattr(PostPlan, "reference", lambda self, x, mask=None: [o * 2 for o in real(self, x, mask)])
    out = tmp_path / "m.onnx"
    code, _, err = cli("merge", models[0], "-o", out, "--post", "softmax")
    assert code == 4
    one_error(err, "parity FAILED", "UNVERIFIED")
    assert out.exists() and (tmp_path / "m.onnx.unverified.json").exists()


def test_an_image_size_that_cannot_fit_in_memory_is_refused_up_front(cli, tmp_path, models):
    # 100000 x 100000 x 3 bytes is 28 GiB per image: the parity check's random images alone would not fit
    before = sha256(models[0])
    code, _, err = cli("merge", models[0], "-o", tmp_path / "m.onnx", "--pre", "image", "--size", "100000x100000")
    assert code == 2, err
    one_error(err, "100000x100000", "memory")
    assert not (tmp_path / "m.onnx").exists() and sha256(models[0]) == before
