"""Flags beside a recipe and knob values: a flag next to ``optimize recipe.yaml`` overrides the recipe's
``search:`` value (and the run says so) or is refused; a pinned knob value outside the knob's range or
choices is refused before the first trial."""

from __future__ import annotations

import json

import pytest
import yaml
from test_optimize import project  # noqa: F401 - the fixture

from onnxforge.errors import UsageError
from onnxforge.pipeline.search.space import SearchSpace


@pytest.fixture
def recipe(project):
    path = project / "search.yaml"
    path.write_text(yaml.safe_dump({
        "model": "model.onnx", "calibration": "calib.npz", "eval": "eval.npz",
        "search": {"max_drop": 0, "objective": "size", "strategy": "grid", "trials": 10, "latency_rounds": 3,
                   "passes": ["prune_channels"],
                   "space": {"prune_channels.ratio": [0.5, 0.75], "prune_channels.importance": ["l2"]}},
    }))
    return path


@pytest.mark.parametrize(("args", "fragment"), [
    (["--trials", "0"], "--trials"),
    (["--time-budget", "-5s"], "positive"),
    (["--calibration", "nope.npz"], "--calibration"),
    (["--eval", "eval.npz"], "--eval"),
    (["--space", "prune_channels.ratio=2.5"], "prune_channels.ratio"),
])
def test_a_flag_beside_a_recipe_is_checked_not_ignored(project, recipe, cli, args, fragment):
    code, _, err = cli("optimize", recipe, "-o", project / "run", *args)
    assert code == 2, err
    assert err.count("error:") == 1 and fragment in err and "Traceback" not in err, err
    assert not (project / "run" / "study.log").exists()


def test_a_flag_beside_a_recipe_overrides_it_and_the_run_says_so(project, recipe, cli):
    code, _, err = cli("optimize", recipe, "-o", project / "run", "--trials", "1")
    assert code in (0, 4), err
    pareto = json.loads((project / "run" / "pareto.json").read_text())
    assert len(pareto["trials"]) == 1
    assert any("--trials 1" in note and "recipe" in note for note in pareto["notes"])
    manifest = json.loads((project / "run" / "manifest.json").read_text())
    assert manifest["config"]["trials"] == 1 and any("--trials 1" in n for n in manifest["notes"])


@pytest.mark.parametrize(("space", "fragment"), [
    ({"prune_channels.ratio": [2.5]}, "prune_channels.ratio"),
    ({"prune_channels.ratio": [-0.1]}, "prune_channels.ratio"),
    ({"prune_channels.importance": ["loudest"]}, "prune_channels.importance"),
])
def test_a_knob_value_outside_its_range_is_refused(space, fragment):
    with pytest.raises(UsageError, match=fragment.replace(".", r"\.")):
        SearchSpace("cpu", ("prune_channels",), space)


def test_knob_values_inside_their_range_are_accepted():
    SearchSpace("cpu", ("prune_channels",), {"prune_channels.ratio": [0.25, 0.5], "prune_channels.importance": ["l2"]})


@pytest.mark.parametrize(("churn", "within_at_three_quarters"), [(None, True), ("0", False)])
def test_max_churn_is_the_searchs_gate_rule_as_every_stages(project, cli, churn, within_at_three_quarters):
    """--max-churn reaches the trials' gate: a loose accuracy tolerance lets the 75% ratio (which changes
    answers) through with the default churn (the tolerance, 50 points), not with --max-churn 0."""
    args = ["--metric", "accuracy", "--tolerance", "50", "--objective", "size", "--strategy", "grid",
            "--pass", "prune_channels", "--space", "prune_channels.ratio=0.5,0.75",
            "--space", "prune_channels.importance=l2", "--trials", "3"]  # the input model, then the two ratios
    if churn is not None:
        args += ["--max-churn", churn]
    code, out, err = cli("optimize", project / "model.onnx", "--calibration", project / "calib.npz",
                         "--eval", project / "eval.npz", "-o", project / "run", "--json", "-", *args)
    assert code == 0, err
    result = json.loads(out)
    assert f"predictions changed on <= {churn or 50}% of samples" in result["gate"]
    within = {r["plan"].get("prune_channels.ratio"): r["within_budget"] for r in result["trials"]}
    assert within == {None: True, 0.5: True, 0.75: within_at_three_quarters}
    assert json.loads((project / "run" / "pareto.json").read_text())["config"]["max_churn"] == (
        None if churn is None else 0.0)


def test_the_gate_rules_beside_a_recipe_override_it():
    from onnxforge.pipeline.data_spec import DataSpec
    from onnxforge.pipeline.search.config import OptimizeConfig, override_from_flags

    config = OptimizeConfig(calibration=DataSpec(path="c.npz"), eval_data=DataSpec(path="e.npz"))
    changed, notes = override_from_flags(config, {"--max-churn": 2.5, "--worst-cosine": 0.9})
    assert (changed.max_churn, changed.worst_cosine) == (2.5, 0.9)
    assert any("--max-churn 2.5" in n and "search.max_churn" in n for n in notes)
