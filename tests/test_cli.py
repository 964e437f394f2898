"""Every subcommand on a tiny model: exit 0, a loadable .onnx where one is written, and JSON that parses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from conftest import IMAGE_SHAPE, NUM_CLASSES, assert_numerically_equal, random_images, run_model


def _loadable(path) -> onnx.ModelProto:
    assert path.is_file(), f"{path} was not written"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return model


def _json_from_stdout(out: str) -> dict:
    # With --json -, stdout must be nothing but the JSON document.
    return json.loads(out)


# ----------------------------------------------------------------------------------------------
# inspect


def test_inspect_prints_inputs_outputs_and_ops(cli, classifier_path):
    code, out, err = cli("inspect", classifier_path)
    assert code == 0, err
    assert "x" in out and "Nx3x8x8" in out
    assert "logits" in out and f"Nx{NUM_CLASSES}" in out
    assert "Conv x1" in out and "Gemm x1" in out


def test_inspect_json_to_stdout(cli, classifier_path):
    code, out, err = cli("inspect", classifier_path, "--json", "-")
    assert code == 0, err
    info = _json_from_stdout(out)
    assert info["inputs"] == [{"name": "x", "shape": ["N", *IMAGE_SHAPE], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": ["N", NUM_CLASSES], "dtype": "float32"}]
    assert info["opset"] == 17
    assert info["ops"] == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}
    assert info["nodes"] == 4
    # conv 4*3*3*3 + 4, fc 5*256 + 5
    assert info["parameters"] == 4 * 3 * 3 * 3 + 4 + NUM_CLASSES * 256 + NUM_CLASSES
    assert info["bytes"] == classifier_path.stat().st_size


def test_inspect_json_to_file(cli, classifier_path, tmp_path):
    report = tmp_path / "reports" / "inspect.json"
    code, out, err = cli("inspect", classifier_path, "--json", report)
    assert code == 0, err
    assert json.loads(report.read_text())["nodes"] == 4
    assert "Conv" in out  # the human-readable text still goes to stdout


# ----------------------------------------------------------------------------------------------
# simplify


def test_simplify_writes_an_equivalent_model(cli, foldable_path, tmp_path):
    output = tmp_path / "simple.onnx"
    code, out, err = cli("simplify", foldable_path, "-o", output)
    assert code == 0, err
    simplified = _loadable(output)
    before = onnx.load(str(foldable_path))
    assert len(simplified.graph.node) < len(before.graph.node)
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)}
    assert_numerically_equal(before, simplified, feeds)
    assert "kept" in out


def test_simplify_json_to_stdout(cli, foldable_path, tmp_path):
    code, out, err = cli("simplify", foldable_path, "-o", tmp_path / "s.onnx", "--json", "-")
    assert code == 0, err
    result = _json_from_stdout(out)
    assert result["nodes_after"] < result["nodes_before"] == 7
    assert {c["method"] for c in result["candidates"]} == {"onnxsim", "onnxslim", "ort"}
    assert result["chosen"] in {"onnxsim", "onnxslim", "ort"}


def test_simplify_single_method(cli, foldable_path, tmp_path):
    code, out, err = cli("simplify", foldable_path, "-o", tmp_path / "s.onnx", "--method", "ort", "--json", "-")
    assert code == 0, err
    result = _json_from_stdout(out)
    assert [c["method"] for c in result["candidates"]] == ["ort"]


# ----------------------------------------------------------------------------------------------
# quantize


def test_quantize_writes_an_int8_model(cli, classifier_path, calibration_npz, eval_npz, tmp_path, int8_faster):
    output = tmp_path / "int8.onnx"
    code, out, err = cli(
        "quantize", classifier_path, "-o", output, "--calibration", calibration_npz, "--eval", eval_npz,
        "--tolerance", "20",
    )
    assert code == 0, err
    model = _loadable(output)
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"QuantizeLinear", "QLinearConv", "ConvInteger", "DequantizeLinear"}, ops
    assert "wrote" in out


def test_quantize_json_lists_every_candidate(cli, classifier_path, calibration_npz, eval_npz, tmp_path, int8_faster):
    code, out, err = cli(
        "quantize", classifier_path, "-o", tmp_path / "int8.onnx", "--calibration", calibration_npz,
        "--eval", eval_npz, "--tolerance", "20", "--json", "-",
    )
    assert code == 0, err
    result = _json_from_stdout(out)
    assert result["metric"] == "accuracy"  # eval has labels
    assert result["fp32_score"] == 1.0  # labels are the fp32 model's own predictions
    assert len(result["candidates"]) >= 2
    assert result["chosen"] in [c["scheme"] for c in result["candidates"]]
    assert result["eval_samples"] == 64


def test_quantize_json_to_file(cli, classifier_path, calibration_npz, tmp_path, int8_faster):
    report = tmp_path / "q.json"
    code, _out, err = cli(
        "quantize", classifier_path, "-o", tmp_path / "int8.onnx", "--calibration", calibration_npz,
        "--tolerance", "50", "--json", report,
    )
    assert code == 0, err
    result = json.loads(report.read_text())
    # Without --eval 20% of the calibration samples are held out (64 -> 51 + 13).
    assert result["calibration_samples"] == 51
    assert result["eval_samples"] == 13
    assert result["metric"] == "agreement"


# ----------------------------------------------------------------------------------------------
# prune


def test_prune_writes_a_sparse_model(cli, classifier_path, tmp_path):
    output = tmp_path / "sparse.onnx"
    code, out, err = cli("prune", classifier_path, "-o", output, "--sparsity", "0.5")
    assert code == 0, err
    model = _loadable(output)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.mean(weights["fc_w"] == 0) == pytest.approx(0.5, abs=0.01)
    assert np.mean(weights["conv_w"] == 0) == pytest.approx(0.5, abs=0.02)
    assert "sparsity" in out


def test_prune_json(cli, classifier_path, tmp_path):
    code, out, err = cli("prune", classifier_path, "-o", tmp_path / "p.onnx", "--sparsity", "0.3", "--json", "-")
    assert code == 0, err
    result = _json_from_stdout(out)
    assert result["requested_sparsity"] == 0.3
    assert result["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert len(result["pruned_layers"]) == 2


# ----------------------------------------------------------------------------------------------
# profile


def test_profile_reports_every_batch(cli, classifier_path):
    code, out, err = cli(
        "profile", classifier_path, "--batch", "1", "--batch", "4", "--min-seconds", "0.05", "--json", "-"
    )
    assert code == 0, err
    result = _json_from_stdout(out)
    assert result["target"] == "cpu"
    assert [r["batch"] for r in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["runs"] >= 20


def test_profile_table_and_json_file(cli, classifier_path, tmp_path):
    report = tmp_path / "profile.json"
    code, out, err = cli("profile", classifier_path, "--threads", "1", "--min-seconds", "0.05", "--json", report)
    assert code == 0, err
    assert "p50 ms" in out
    rows = json.loads(report.read_text())["rows"]
    assert [(r["batch"], r["threads"]) for r in rows] == [(1, 1)]


def test_profile_with_sample_data(cli, classifier_path, calibration_npz):
    code, out, err = cli(
        "profile", classifier_path, "--data", calibration_npz, "--batch", "2", "--min-seconds", "0.05", "--json", "-"
    )
    assert code == 0, err
    assert _json_from_stdout(out)["rows"][0]["batch"] == 2


# ----------------------------------------------------------------------------------------------
# export


def test_export_torch_callable(cli, torch_model_file, tmp_path):
    output = tmp_path / "exported.onnx"
    code, out, err = cli(
        "export", f"{torch_model_file}:build", "-o", output, "--input-shape", "input=1x3x8x8", "--dynamic-batch"
    )
    assert code == 0, err
    model = _loadable(output)
    assert "parity ok" in out
    # the dynamic batch really is dynamic
    for batch in (1, 3):
        (logits,) = run_model(model, {"input": random_images(batch)})
        assert logits.shape == (batch, NUM_CLASSES)


def test_export_json(cli, torch_model_file, tmp_path):
    code, out, err = cli(
        "export", f"{torch_model_file}:build", "-o", tmp_path / "e.onnx", "--input-shape", "input=1x3x8x8",
        "--exporter", "torchscript", "--json", "-",
    )
    assert code == 0, err
    result = _json_from_stdout(out)
    assert result["exporter"] == "torchscript"
    assert result["verified"] is True
    assert result["parity"]["ok"] is True
    assert result["inputs"][0]["name"] == "input"
    assert result["inputs"][0]["shape"] == [1, 3, 8, 8]


def test_export_onnx_source_copies_a_valid_model(cli, classifier_path, tmp_path):
    output = tmp_path / "copy.onnx"
    code, _out, err = cli("export", classifier_path, "-o", output)
    assert code == 0, err
    assert_numerically_equal(classifier_path, output, {"x": random_images(2)})


# ----------------------------------------------------------------------------------------------
# run


def test_run_recipe(cli, classifier_path, calibration_npz, eval_npz, tmp_path, int8_faster):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            name: tiny
            model: {classifier_path.name}
            calibration: {calibration_npz.name}
            eval: {eval_npz.name}
            stages:
              - simplify
              - prune: {{sparsity: 0.2, tolerance: 100}}
              - quantize: {{tolerance: 100}}
            """
        )
    )
    run_dir = tmp_path / "run"
    code, out, err = cli("run", recipe, "-o", run_dir, "--json", "-")
    assert code == 0, err
    manifest = _json_from_stdout(out)
    assert [s["name"] for s in manifest["stages"]] == ["simplify", "prune", "quantize"]
    assert manifest["completed"] == ["simplify", "prune", "quantize"]
    for name in ("01_simplify.onnx", "02_prune.onnx", "03_quantize.onnx"):
        _loadable(run_dir / name)
    assert json.loads((run_dir / "manifest.json").read_text())["completed"] == manifest["completed"]


def test_run_default_folder_is_runs_slash_name(cli, classifier_path, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: named\nmodel: {classifier_path}\nstages: [simplify]\n")
    monkeypatch.chdir(tmp_path)
    code, _out, err = cli("run", recipe)
    assert code == 0, err
    _loadable(tmp_path / "runs" / "named" / "01_simplify.onnx")
    assert (tmp_path / "runs" / "named" / "manifest.json").is_file()


# ----------------------------------------------------------------------------------------------
# demo (shares one run with the other demo tests; see conftest's demo_run)


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(demo_run):
    from onnxforge.pipeline.recipe import load_recipe

    assert demo_run.code == 0, demo_run.err
    run_dir = demo_run.run_dir
    recipe = load_recipe(run_dir / "recipe.yaml")  # the demo writes the recipe it runs
    names = [s.name for s in recipe.stages]
    kinds = [s.kind for s in recipe.stages]
    assert kinds[0] == "export" and "quantize" in kinds
    for index, name in enumerate(names, start=1):
        _loadable(run_dir / f"{index:02d}_{name}.onnx")
    assert (run_dir / "data" / "calibration.npz").is_file()
    manifest = json.loads(demo_run.json_path.read_text())
    assert manifest["completed"] == names
    # every stage is scored on the labelled held-out split and keeps a real accuracy
    for stage in manifest["stages"]:
        assert 0.9 <= stage["metrics"]["accuracy"] <= 1.0
    assert demo_run.out.count("\n") > len(names)  # the table went to stdout


@pytest.mark.slow
def test_demo_second_run_is_cached(cli, demo_run):
    code, out, err = cli("demo", "-o", demo_run.run_dir, "--json", "-", "--cache-dir", demo_run.cache_dir)
    assert code == 0, err
    manifest = _json_from_stdout(out)
    assert manifest["stages"] and all(s["status"] == "cached" for s in manifest["stages"])


# ----------------------------------------------------------------------------------------------
# the installed entry point


def test_module_entry_point_version_and_help():
    result = subprocess.run([sys.executable, "-m", "onnxforge", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("export", "simplify", "quantize", "prune", "profile", "inspect", "run", "demo"):
        assert command in result.stdout
