"""The ``distill`` stage in the pipeline: a recipe DAG whose distill stage reads the framework source
and the pruned graph, the one-line refusal for an .onnx recipe model, and the search chaining
distillation after a structure pass (its trial records say what was trained, for how long)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from onnxforge.converters.distill import NO_ONNX_BRIDGE
from onnxforge.errors import RecipeError, UsageError
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import Metric, QualityGate
from onnxforge.pipeline.recipe import load_recipe
from onnxforge.pipeline.registry import StageContext
from onnxforge.pipeline.runner import run_recipe, source_fingerprint
from onnxforge.pipeline.search.space import SearchSpace, TrialPlan
from onnxforge.pipeline.search.trial import TrialContext, evaluate_plan, stage_specs

TEACHER = f"{Path(__file__).parents[1] / 'converters' / 'distill_teacher.py'}:build"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("distill-stage")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((256, 3, 8, 8)).astype(np.float32))
    np.savez(folder / "eval.npz", x=rng.standard_normal((64, 3, 8, 8)).astype(np.float32))
    return folder


def _recipe(folder: Path, stages: list, model: str = TEACHER) -> Path:
    path = folder / f"recipe-{len(list(folder.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump({"model": model, "dynamic_batch": True, "calibration": "calib.npz",
                                    "eval": "eval.npz", "stages": stages}))
    return path


@pytest.mark.slow  # a real export of a file.py:callable source, in its child process
def test_a_recipe_distills_the_pruned_model_against_its_source(project):
    recipe = load_recipe(_recipe(project, [
        "export", {"prune_channels": {"ratio": 0.75, "tolerance": 100.0}},
        {"distill": {"inputs": ["source", "prune_channels"], "epochs": 2, "tolerance": 100.0}}]))
    distill = recipe.stages[-1]
    assert distill.inputs == ("source", "prune_channels")
    assert distill.config.calibration_data.path == project / "calib.npz"
    assert distill.config.eval_data.path == project / "eval.npz"
    result = run_recipe(recipe, project / "run", measure=False)
    record = result.stages[-1]
    assert record.kind == "distill" and record.status == "done" and record.verified
    assert record.inputs == [TEACHER, str(project / "run" / "02_prune_channels.onnx")]
    assert record.result["parity_before"]["max_abs_error"] < 1e-4
    assert "distilled 2 epochs" in record.summary
    again = run_recipe(recipe, project / "run", measure=False)  # same inputs: the cache answers
    assert again.stages[-1].status == "cached"


def test_distill_takes_the_source_and_the_previous_stage_by_default(project):
    recipe = load_recipe(_recipe(project, ["export", {"prune_channels": {"ratio": 0.5}}, "distill"]))
    assert recipe.stages[-1].inputs == ("source", "prune_channels")
    with pytest.raises(RecipeError, match="reads the recipe's model"):
        load_recipe(_recipe(project, ["export", {"prune_channels": {"ratio": 0.5}},
                                      {"distill": {"inputs": ["export", "prune_channels"]}}]))


def test_an_onnx_recipe_model_gets_the_one_line_explanation(project):
    model = project / "run" / "01_export.onnx"
    if not model.exists():
        pytest.skip("needs the exported model of the recipe test")
    recipe = load_recipe(_recipe(project, [{"prune_channels": {"ratio": 0.5, "tolerance": 100.0}}, "distill"],
                                  model=str(model)))
    with pytest.raises(UsageError) as info:
        run_recipe(recipe, project / "onnx-run", measure=False)
    assert info.value.message == NO_ONNX_BRIDGE
    assert info.value.record.status == "failed"


def test_the_search_chains_distill_after_a_structure_pass_only():
    context = StageContext(calibration=DataSpec(path=Path(__file__)))
    plan = TrialPlan({}, (("prune_channels", {"ratio": 0.5}), ("distill", {"epochs": 10}), ("quantize", {})))
    specs = stage_specs(plan, context)
    assert [(s.kind, s.inputs) for s in specs] == [
        ("prune_channels", ("start",)), ("distill", ("source", "01_prune_channels")), ("quantize", ("02_distill",))]
    alone = stage_specs(TrialPlan({}, (("distill", {"epochs": 10}),)), context)
    assert alone == []  # nothing was removed: nothing to recover
    assert "distill" in SearchSpace("cpu").knobs
    assert "distill" not in SearchSpace("cpu", has_source=False).knobs  # an .onnx input has no source
    assert all(seed.get("recovery", "none") == "none" for seed in SearchSpace("cpu").seeds())


def test_a_trial_record_says_which_models_were_distilled_and_for_how_long(project, tmp_path):
    start = project / "run" / "01_export.onnx"
    if not start.exists():
        pytest.skip("needs the exported model of the recipe test")
    from onnxforge.model_io import file_sha256

    ctx = TrialContext(start_model=str(start), start_sha256=file_sha256(start), reference_model=str(start),
                       calibration=DataSpec(path=project / "calib.npz"), eval_path=str(project / "eval.npz"),
                       target="cpu", gate=QualityGate(metric=Metric.AGREEMENT, tolerance=100.0), reference_score=1.0,
                       batch=1, threads=1, rounds=3, cache_root=str(tmp_path / "cache"),
                       source=TEACHER, source_sha256=source_fingerprint(TEACHER))
    plan = TrialPlan({"structure": "prune_channels", "recovery": "distill"},
                     (("prune_channels", {"ratio": 0.75}), ("distill", {"epochs": 2})))
    record = evaluate_plan(0, plan, ctx, tmp_path / "trial.onnx", timing=False)
    assert record["status"] == "ok", record.get("error")
    assert record["distilled"] is True and record["training_seconds"] > 0
    assert [s["kind"] for s in record["stages"]] == ["prune_channels", "distill"]
    plain = evaluate_plan(1, TrialPlan({}, (("prune_channels", {"ratio": 0.75}),)), ctx, tmp_path / "p.onnx",
                          timing=False)
    assert plain["distilled"] is False and plain["training_seconds"] == 0
