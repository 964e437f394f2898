"""The runner: stage files, caching by key and file hash, --force, the manifest."""

from __future__ import annotations

import json
import os
import re
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TORCH_MODEL_SOURCE, make_classifier, random_images, save, sha256, write_npz

from onnxforge.errors import QualityGateError
from onnxforge.pipeline.recipe import load_recipe
from onnxforge.pipeline.runner import run_recipe

# The tiny test models are overhead-bound (int8 measures ~0.73x fp32), so quantize would keep the input
# and exit 4 (issue 23); these tests are about other things, so int8 is timed 2x faster (conftest.int8_faster).
pytestmark = pytest.mark.usefixtures("int8_faster")

RECIPE = """
name: tiny
model: classifier.onnx
calibration: calib.npz
eval: eval.npz
stages:
  - simplify
  - prune: {{sparsity: {sparsity}, tolerance: 100}}
  - quantize: {{tolerance: 100, latency_rounds: 3}}
"""
STAGE_FILES = ["01_simplify.onnx", "02_prune.onnx", "03_quantize.onnx"]


@pytest.fixture
def project(tmp_path, classifier_path, calibration_npz, eval_npz) -> Path:
    return tmp_path


def _run(project: Path, *, sparsity=0.3, force=False, measure=False, run_dir=None):
    recipe_path = project / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(sparsity=sparsity))
    return run_recipe(load_recipe(recipe_path), run_dir or project / "run", force=force, measure=measure)


def _statuses(result) -> dict[str, str]:
    return {s.name: s.status for s in result.stages}


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_first_run_writes_every_stage_and_the_manifest(project):
    result = _run(project, measure=True)
    run_dir = project / "run"
    assert _statuses(result) == {"simplify": "done", "prune": "done", "quantize": "done"}
    # an .onnx recipe: the input model is the measured baseline, outside the stage list
    baseline = result.manifest.baseline
    assert (baseline.name, baseline.status) == ("input", "input")
    assert baseline.metrics["speedup_vs_first"] == 1.0 and "latency_p50_ms" in baseline.metrics
    manifest = _manifest(run_dir)
    assert manifest["completed"] == ["simplify", "prune", "quantize"]
    assert result.metric == "accuracy"

    for stage, name in zip(manifest["stages"], STAGE_FILES, strict=False):
        output = stage["output"]
        assert output["path"] == name
        # the recorded hash and size are those of the file on disk
        assert output["sha256"] == sha256(run_dir / name)
        assert output["bytes"] == (run_dir / name).stat().st_size
        onnx.checker.check_model(onnx.load(str(run_dir / name)))
        assert output["inputs"][0]["name"] == "x"
        metrics = stage["metrics"]
        assert 0.0 <= metrics["accuracy"] <= 1.0
        latency = metrics["latency"]
        assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
        assert metrics["latency_p50_ms"] == latency["p50_ms"]
        assert metrics["bytes"] == output["bytes"]
    assert manifest["input"]["metrics"]["speedup_vs_first"] == 1.0  # the input model is the baseline
    assert manifest["stages"][0]["metrics"]["accuracy"] == 1.0  # simplify changes nothing

    versions = manifest["tool_versions"]
    for tool in ("onnx", "onnxruntime", "torch", "onnxforge"):
        assert versions[tool] == metadata.version(tool)
    assert manifest["recipe"]["name"] == "tiny"
    assert manifest["stages"][1]["config"]["sparsity"] == 0.3


def test_second_run_is_cached_and_leaves_the_files_alone(project):
    _run(project)
    hashes = {name: sha256(project / "run" / name) for name in STAGE_FILES}
    mtimes = {name: (project / "run" / name).stat().st_mtime_ns for name in STAGE_FILES}
    result = _run(project)
    assert _statuses(result) == {"simplify": "cached", "prune": "cached", "quantize": "cached"}
    assert {name: sha256(project / "run" / name) for name in STAGE_FILES} == hashes
    assert {name: (project / "run" / name).stat().st_mtime_ns for name in STAGE_FILES} == mtimes
    manifest = _manifest(project / "run")
    assert [s["status"] for s in manifest["stages"]] == ["cached"] * 3
    assert manifest["completed"] == ["simplify", "prune", "quantize"]
    # a cached stage still carries what it did
    assert manifest["stages"][1]["result"]["requested_sparsity"] == 0.3


def test_changing_a_stage_config_reruns_it_and_everything_after(project):
    first = _run(project)
    second = _run(project, sparsity=0.6)
    assert _statuses(second) == {"simplify": "cached", "prune": "done", "quantize": "done"}
    assert second.stages[1].key != first.stages[1].key
    pruned = onnx.load(str(project / "run" / "02_prune.onnx"))
    fc_w = next(onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer if i.name == "fc_w")
    assert np.mean(fc_w == 0) == pytest.approx(0.6, abs=0.01)  # the file really is the new one


def test_force_reruns_everything(project):
    _run(project)
    result = _run(project, force=True)
    assert _statuses(result) == {"simplify": "done", "prune": "done", "quantize": "done"}


def test_a_changed_output_file_is_restored_from_the_cache(project):
    first = _run(project)
    original = sha256(project / "run" / "02_prune.onnx")
    tampered = project / "run" / "02_prune.onnx"
    save(make_classifier(seed=5), tampered)
    result = _run(project)
    # the run folder's copy is not trusted: the verified cache entry replaces it, and the keys are unchanged
    assert _statuses(result) == {"simplify": "cached", "prune": "cached", "quantize": "cached"}
    assert sha256(tampered) == original
    assert _manifest(project / "run")["stages"][1]["output"]["sha256"] == original
    assert [s.key for s in result.stages] == [s.key for s in first.stages]


def test_a_deleted_output_file_is_restored(project):
    _run(project)
    (project / "run" / "03_quantize.onnx").unlink()
    result = _run(project)
    assert _statuses(result) == {"simplify": "cached", "prune": "cached", "quantize": "cached"}
    assert (project / "run" / "03_quantize.onnx").exists()
    assert result.stages[2].cache.startswith("restored")
    # it says where the file came from and when that entry was computed, not only "cached"
    cache_root = os.environ["ONNXFORGE_CACHE_DIR"]  # conftest's private cache for this test
    assert cache_root in result.stages[2].cache
    assert re.search(r"entry written \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", result.stages[2].cache)
    assert cache_root in result.stages[0].cache and "unchanged since the last run" in result.stages[0].cache


def test_new_calibration_data_reruns_only_the_stages_that_read_it(project):
    _run(project)
    write_npz(project / "calib.npz", x=random_images(64, seed=99))
    result = _run(project)
    # simplify checks parity on the recipe's data; it writes the same file, so prune's input is unchanged
    assert _statuses(result) == {"simplify": "done", "prune": "cached", "quantize": "done"}


def test_a_changed_source_model_reruns_everything(project):
    _run(project)
    save(make_classifier(seed=3), project / "classifier.onnx")
    result = _run(project)
    assert _statuses(result) == {"simplify": "done", "prune": "done", "quantize": "done"}


def test_quality_gate_failure_is_recorded_and_the_best_file_kept(project):
    recipe_path = project / "gate.yaml"
    recipe_path.write_text(
        "model: classifier.onnx\ncalibration: calib.npz\neval: eval.npz\n"
        "stages:\n  - simplify\n  - quantize: {metric: cosine, tolerance: 0.9999999, latency_rounds: 3}\n"
    )
    run_dir = project / "gate_run"
    with pytest.raises(QualityGateError):
        run_recipe(load_recipe(recipe_path), run_dir)
    manifest = _manifest(run_dir)
    assert [s["status"] for s in manifest["stages"]] == ["done", "quality-gate-failed"]
    assert manifest["completed"] == ["simplify"]
    kept = manifest["stages"][1]["output"]
    assert kept["sha256"] == sha256(run_dir / "02_quantize.onnx")
    assert manifest["stages"][1]["verified"] is False
    # a failed stage is never taken from the cache
    with pytest.raises(QualityGateError):
        run_recipe(load_recipe(recipe_path), run_dir)
    assert [s["status"] for s in _manifest(run_dir)["stages"]] == ["cached", "quality-gate-failed"]


def test_export_stage_from_python_is_cached_until_the_source_changes(tmp_path):
    (tmp_path / "model.py").write_text(TORCH_MODEL_SOURCE)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        textwrap.dedent(
            """
            model: model.py:build
            input_shapes: {input: [1, 3, 8, 8]}
            dynamic_batch: true
            stages: [export, simplify]
            """
        )
    )
    run_dir = tmp_path / "run"
    first = run_recipe(load_recipe(recipe_path), run_dir, measure=False)
    assert _statuses(first) == {"export": "done", "simplify": "done"}
    assert first.stages[0].verified
    assert first.stages[0].result["parity"]["ok"] is True
    exported = onnx.load(str(run_dir / "01_export.onnx"))
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch

    assert _statuses(run_recipe(load_recipe(recipe_path), run_dir, measure=False)) == {
        "export": "cached", "simplify": "cached"
    }
    (tmp_path / "model.py").write_text(TORCH_MODEL_SOURCE.replace("torch.manual_seed(0)", "torch.manual_seed(1)"))
    third = run_recipe(load_recipe(recipe_path), run_dir, measure=False)
    assert _statuses(third) == {"export": "done", "simplify": "done"}


def test_a_stage_summary_quotes_the_speed_the_run_table_shows(project, monkeypatch):
    """The stage's own check and the run table time separately (here 1.90x and then 2.12x, as a loaded
    machine might answer); the row's phrase must say the table's number, not the check's."""
    from onnxforge.pipeline import reference
    from onnxforge.targets.latency import LatencyStats

    speeds = iter([1.90, 2.12, 2.50, 2.75])

    def timed(sessions, feeds, **_):
        speed = next(speeds)
        base, *others = list(sessions)
        stats = {base: LatencyStats(2.0, 2.0, 2.0, 2.0, 0.0, 30, 1)}
        for name in others:
            p50 = 2.0 / speed
            stats[name] = LatencyStats(p50, p50, p50, p50, 0.0, 30, 1)
        return stats

    monkeypatch.setattr(reference, "compare_latency", timed)
    (project / "recipe.yaml").write_text(textwrap.dedent("""\
        name: speed
        model: classifier.onnx
        calibration: calib.npz
        eval: eval.npz
        stages:
          - prune_channels: {ratio: 0.5, tolerance: 100}
        """))
    result = run_recipe(load_recipe(project / "recipe.yaml"), project / "run", measure=True)
    (stage,) = result.stages
    assert stage.result["measured_speedup"] == pytest.approx(1.90)  # the stage's own check, kept in its result
    table = f"{stage.metrics['speedup_vs_first']:.2f}x"
    assert table == "2.12x"
    assert f"measured {table} the input's speed" in stage.summary
    assert stage.metrics["speedup_vs_input"] == stage.metrics["speedup_vs_first"]
    assert _manifest(project / "run")["stages"][0]["summary"] == stage.summary
