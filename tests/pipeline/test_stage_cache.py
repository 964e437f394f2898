"""The content-addressed stage cache through the runner: shared across run folders, exactly the stages
downstream of an edit recomputed, tampered entries detected, concurrent runs safe; recipes as a DAG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import sha256

from onnxforge.errors import RecipeError
from onnxforge.pipeline.cache import StageCache
from onnxforge.pipeline.recipe import load_recipe
from onnxforge.pipeline.runner import run_recipe

# tolerance 100: the cache is the subject here, not the quality gate (held-out calibration samples of
# random images gate pruning the tiny classifier since issue 12)
DAG = """
name: dag
model: classifier.onnx
calibration: calib.npz
stages:
  - simplify
  - prune_channels: {{name: half, ratio: {ratio}, metric: agreement, tolerance: 100}}
  - prune: {{name: sparse, inputs: [half], sparsity: 0.3, metric: agreement, tolerance: 100}}
  - prune_channels: {{name: quarter, inputs: [simplify], ratio: 0.25, metric: agreement, tolerance: 100}}
"""


def _recipe(project: Path, ratio: float = 0.5, text: str = DAG) -> Path:
    path = project / "recipe.yaml"
    path.write_text(textwrap.dedent(text.format(ratio=ratio)))
    return path


def _run(project: Path, run_dir: str = "run", **kwargs):
    return run_recipe(load_recipe(project / "recipe.yaml"), project / run_dir, measure=False, **kwargs)


def _statuses(result) -> dict[str, str]:
    return {s.name: s.status for s in result.stages}


@pytest.fixture
def project(tmp_path, classifier_path, calibration_npz) -> Path:
    _recipe(tmp_path)
    return tmp_path


def test_a_stage_names_its_inputs(project):
    result = _run(project)
    assert [s.inputs for s in result.stages] == [
        [str(project / "classifier.onnx")],
        [str(project / "run" / "01_simplify.onnx")],
        [str(project / "run" / "02_half.onnx")],
        [str(project / "run" / "01_simplify.onnx")],
    ]
    manifest = json.loads((project / "run" / "manifest.json").read_text())
    assert manifest["recipe"]["stages"][3]["inputs"] == ["simplify"]
    assert all(s["summary"] for s in manifest["stages"])  # every pass says what it did


def test_a_recipe_run_twice_reuses_everything_even_in_another_folder(project):
    first = _run(project)
    again = _run(project)
    elsewhere = _run(project, "other_run")
    assert set(_statuses(again).values()) == {"cached"}
    assert set(_statuses(elsewhere).values()) == {"cached"}
    for a, b in zip(first.stages, elsewhere.stages, strict=False):
        assert a.key == b.key and a.output["sha256"] == b.output["sha256"]
        assert sha256(project / "other_run" / b.output["path"]) == a.output["sha256"]


def test_an_edit_recomputes_exactly_the_stages_downstream_of_it(project):
    _run(project)
    _recipe(project, ratio=0.75)
    result = _run(project)
    # half changed; sparse reads half; quarter reads simplify and is untouched
    assert _statuses(result) == {"simplify": "cached", "half": "done", "sparse": "done", "quarter": "cached"}


def test_a_tampered_cache_entry_is_detected_and_recomputed(project, tmp_path):
    cache = StageCache(tmp_path / "cache")
    first = _run(project, cache=cache)
    key = first.stages[1].key
    entry = tmp_path / "cache" / key[:2] / key / "model.onnx"
    entry.write_bytes(entry.read_bytes()[:-10] + b"0123456789")
    messages = []
    result = run_recipe(load_recipe(project / "recipe.yaml"), project / "run2", measure=False, cache=cache,
                        progress=lambda event: messages.append(event.describe()))
    assert _statuses(result)["half"] == "done"
    assert "does not match its recorded sha256" in result.stages[1].cache
    assert any("half: running (cached entry was modified" in m for m in messages)
    assert result.stages[1].output["sha256"] == first.stages[1].output["sha256"]  # recomputed, same bytes
    assert _run(project, "run3", cache=cache).stages[1].status == "cached"  # and re-published


def test_no_cache_recomputes_and_stores_nothing(project, tmp_path):
    _run(project, cache=StageCache(None))
    result = _run(project, cache=StageCache(None))
    assert set(_statuses(result).values()) == {"done"}


def test_two_concurrent_runs_of_one_recipe_both_succeed_with_identical_outputs(project, tmp_path):
    env = {**os.environ, "ONNXFORGE_CACHE_DIR": str(tmp_path / "shared-cache")}
    command = [sys.executable, "-m", "onnxforge", "run", str(project / "recipe.yaml"), "--json", "-", "-o"]
    procs = [subprocess.Popen([*command, str(project / name)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("race_a", "race_b")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outputs]
    manifests = [json.loads(out) for out, _ in outputs]
    hashes = [[s["output"]["sha256"] for s in m["stages"]] for m in manifests]
    assert hashes[0] == hashes[1]
    for name, manifest in zip(("race_a", "race_b"), manifests, strict=False):
        for stage in manifest["stages"]:
            assert sha256(project / name / stage["output"]["path"]) == stage["output"]["sha256"]


@pytest.mark.parametrize(("stages", "fragment"), [
    ("[simplify, {prune: {inputs: [nowhere]}}]", "'nowhere' is not an earlier stage"),
    ("[simplify, {prune: {name: simplify}}]", "used twice"),
    ("[simplify, {prune: {name: '../x'}}]", "must be letters"),
    ("[simplify, {prune: {inputs: [simplify, source]}}]", "takes 1 input"),
    ("[simplify, {export: {}}]", "export"),
])
def test_bad_stage_graphs_are_recipe_errors(project, stages, fragment):
    (project / "recipe.yaml").write_text(f"model: classifier.onnx\nstages: {stages}\n")
    with pytest.raises(RecipeError, match=fragment):
        load_recipe(project / "recipe.yaml")


def test_calibration_with_image_options_is_recipe_config(project):
    (project / "imgs").mkdir()
    (project / "recipe.yaml").write_text(
        "model: classifier.onnx\n"
        "calibration: {path: imgs, image_size: [8, 8], mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}\n"
        "stages: [quantize]\n"
    )
    recipe = load_recipe(project / "recipe.yaml")
    assert recipe.calibration.image.size == (8, 8)  # the flat spelling is one ImagePreprocessing
    assert recipe.to_json()["calibration"]["mean"] == [0.5, 0.5, 0.5]


def test_cache_command_reports_and_clears(project, tmp_path, cli):
    cache = tmp_path / "cache"
    _run(project, cache=StageCache(cache))
    code, out, _ = cli("cache", "--cache-dir", cache)
    assert code == 0 and "4 stage outputs" in out
    code, out, _ = cli("cache", "--clear", "--cache-dir", cache)
    assert code == 0 and "removed 4" in out
    assert StageCache(cache).usage() == (0, 0)
    assert set(_statuses(_run(project, cache=StageCache(cache))).values()) == {"done"}


def test_a_record_is_verified_and_cleared_with_the_cache(tmp_path):
    """Records (quantize's timings) are kept beside the entries, checked by sha256, removed by clear()."""
    cache = StageCache(tmp_path / "cache")
    cache.save_record("quantize-timings", "k1", {"fp32": {"p50_ms": 1.5}})
    assert cache.record("quantize-timings", "k1") == {"fp32": {"p50_ms": 1.5}}
    assert cache.record("quantize-timings", "other") is None

    path = next((tmp_path / "cache").rglob("k1.json"))
    path.write_text(path.read_text().replace("1.5", "0.1"))  # a faster fp32, by hand
    assert cache.record("quantize-timings", "k1") is None and not path.exists()

    cache.save_record("quantize-timings", "k2", {"x": 1})
    cache.clear()
    assert cache.record("quantize-timings", "k2") is None
    assert StageCache(None).record("quantize-timings", "k2") is None  # --no-cache: nothing recorded or read


@pytest.mark.parametrize("on", [True, False])
def test_a_recorded_measurement_is_measured_once_and_again_when_its_record_has_another_shape(tmp_path, on):
    """cache.recorded, which op_time's profiles and quantize's timings go through."""
    from onnxforge.pipeline.cache import recorded

    cache = StageCache(tmp_path / "cache") if on else None
    calls = []

    def measure() -> dict:
        calls.append(1)
        return {"p50_ms": float(len(calls))}

    def decode(data) -> dict:
        return {"p50_ms": float(data["p50_ms"])}

    first = recorded(cache, "test-kind", "k", measure, decode=decode, encode=dict)
    second = recorded(cache, "test-kind", "k", measure, decode=decode, encode=dict)
    assert first == ({"p50_ms": 1.0}, False)
    assert second == (({"p50_ms": 1.0}, True) if on else ({"p50_ms": 2.0}, False))  # no cache: measured each time
    if cache is not None:
        cache.save_record("test-kind", "k", {"other": "shape"})
        assert recorded(cache, "test-kind", "k", measure, decode=decode, encode=dict) == ({"p50_ms": 2.0}, False)
        assert cache.record("test-kind", "k") == {"p50_ms": 2.0}  # the new measurement replaced it
