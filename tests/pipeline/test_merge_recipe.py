"""The merge stage in recipes: an ensemble of two earlier stages (a DAG with two inputs), measured by
the runner; a merged graph with its own inputs, measured by itself; merge kept last."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from conftest import run_model

from onnxforge.errors import MergeError, RecipeError
from onnxforge.pipeline.recipe import SOURCE, load_recipe
from onnxforge.pipeline.runner import run_recipe


@pytest.fixture
def project(tmp_path, classifier_path, eval_npz):
    return tmp_path


def _recipe(folder, stages: str):
    path = folder / "recipe.yaml"
    path.write_text("name: merged\nmodel: classifier.onnx\neval: eval.npz\nstages:\n" + textwrap.indent(
        textwrap.dedent(stages).strip(), "  ") + "\n")
    return load_recipe(path)


ENSEMBLE = """
- simplify: {name: a}
- prune: {name: b, inputs: [source], sparsity: 0.3, tolerance: 100}
- merge: {inputs: [a, b], ensemble: vote}
"""


def test_an_ensemble_stage_takes_two_earlier_stages(project):
    recipe = _recipe(project, ENSEMBLE)
    merge_stage = recipe.stages[-1]
    assert merge_stage.inputs == ("a", "b") and recipe.stages[1].inputs == (SOURCE,)
    assert merge_stage.config.eval_data.path == project / "eval.npz"  # filled from the recipe's eval
    result = run_recipe(recipe, project / "run")
    record = result.stages[-1]
    assert record.status == "done" and record.verified
    assert record.inputs == [str(project / "run" / "01_a.onnx"), str(project / "run" / "02_b.onnx")]
    assert record.summary.startswith("vote of 2 models, parity max err")
    # the stage scored itself from its 'label' output; the runner reads class scores from the first
    with np.load(project / "eval.npz") as data:
        x, labels = data["x"], data["label"]
    _, label = run_model(project / "run" / "03_merge.onnx", {"x": x})
    assert record.metrics["accuracy"] == pytest.approx((label == labels).mean())
    assert record.result["accuracy"]["members"].keys() == {"01_a.onnx", "02_b.onnx"}
    assert record.metrics["latency_p50_ms"] > 0  # same inputs as the eval data: timed side by side
    again = run_recipe(recipe, project / "run")
    assert again.stages[-1].status == "cached"


def test_a_merged_graph_with_raw_inputs_is_measured_by_the_stage(project):
    result = run_recipe(_recipe(project, "- merge: {pre: image, post: topk, top_k: 2}"), project / "run")
    record = result.stages[-1]
    assert record.output["inputs"][0]["dtype"] == "uint8"
    assert record.metrics["accuracy"] == record.result["accuracy"]["merged"]
    assert "measured by the stage itself" in record.metrics["note"]
    assert record.metrics["latency_p50_ms"] > 0  # timed on random uint8 images
    assert result.manifest.baseline.metrics["accuracy"] == 1.0  # eval labels are the model's own


@pytest.mark.parametrize("stages", [
    "- merge: {post: softmax}\n- quantize: {tolerance: 1}",
    "- merge: {name: m, post: softmax}\n- simplify: {name: s, inputs: [source]}\n- prune: {inputs: [m]}",
    "- merge: {name: m, post: softmax}\n- simplify: {name: s, inputs: [m]}\n- prune: {inputs: [s]}",
])
def test_stages_after_a_merge_are_refused(project, stages):
    with pytest.raises(RecipeError, match="merges pre/post-processing into the graph") as info:
        _recipe(project, stages)
    assert "put m" in info.value.hint


def test_packaging_after_packaging_and_a_branch_beside_a_merge_are_fine(project):
    recipe = _recipe(project, """
        - merge: {name: m1, post: softmax}
        - simplify: {name: s, inputs: [source]}
        - merge: {name: m2, inputs: [m1]}
        - merge: {name: m3, inputs: [s, s, s]}
    """)
    assert [s.inputs for s in recipe.stages] == [(SOURCE,), (SOURCE,), ("m1",), ("s", "s", "s")]


def test_a_fixed_arity_stage_still_takes_its_count(project):
    with pytest.raises(RecipeError, match="simplify takes 1 input"):
        _recipe(project, "- simplify: {inputs: [source, source]}")


def test_a_tokenizer_stage_names_its_vocabulary(project):
    recipe = _recipe(project, "- merge: {tokenizer: {}, post: mean-pool-l2}")
    with pytest.raises(MergeError, match="names its vocabulary"):
        run_recipe(recipe, project / "run", measure=False)
