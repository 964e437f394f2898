"""Recipes: YAML -> the same frozen config objects the API takes, paths relative to the recipe."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from onnxforge.errors import RecipeError
from onnxforge.parity import Tolerance
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.prune.magnitude import MagnitudePruneConfig, Scope
from onnxforge.pipeline.quantize import CalibrationMethod, QuantizeConfig
from onnxforge.pipeline.recipe import config_from_mapping, load_recipe
from onnxforge.pipeline.simplify import SimplifyConfig, SimplifyMethod


@pytest.fixture
def project(tmp_path, torch_model_file) -> Path:
    """A folder with model.py, data files and a sub-folder to run from."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "calib.npz").write_bytes(b"")  # only existence is checked when loading a recipe
    (tmp_path / "data" / "eval.npz").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_full_recipe(project, monkeypatch):
    path = _write(
        project,
        """
        name: tiny-cnn
        model: model.py:build
        input_shapes: {input: [1, 3, 8, 8]}
        dynamic_batch: true
        calibration: data/calib.npz
        eval: data/eval.npz
        stages:
          - export
          - simplify: {method: onnxslim}
          - prune: {sparsity: 0.3, scope: global}
          - quantize: {tolerance: 1.5, calibration_method: percentile}
        """,
    )
    monkeypatch.chdir(project / "elsewhere")  # relative paths follow the recipe, not the cwd
    recipe = load_recipe(path)
    assert recipe.name == "tiny-cnn"
    assert recipe.model == f"{project.resolve() / 'model.py'}:build"
    assert recipe.calibration.path == project.resolve() / "data" / "calib.npz"
    assert recipe.eval_data.path == project.resolve() / "data" / "eval.npz"
    assert recipe.input_shapes == {"input": (1, 3, 8, 8)}
    assert [s.name for s in recipe.stages] == ["export", "simplify", "prune", "quantize"]

    export, simplify, prune, quantize = (s.config for s in recipe.stages)
    # top-level settings flow into the stages that use them
    assert export.input_shapes == {"input": (1, 3, 8, 8)} and export.dynamic_batch is True
    # the recipe's data is simplify's parity data too (it ignored it: random inputs only)
    assert simplify == SimplifyConfig(method=SimplifyMethod.ONNXSLIM, input_shapes={"input": (1, 3, 8, 8)},
                                      sample_data=recipe.calibration.path)
    assert prune.scope is Scope.GLOBAL and prune.sparsity == 0.3
    assert prune.eval_data == recipe.eval_data  # the whole DataSpec, not its path
    assert isinstance(quantize, QuantizeConfig)
    assert quantize.tolerance == 1.5 and quantize.calibration_method is CalibrationMethod.PERCENTILE
    assert quantize.eval_data == recipe.eval_data and quantize.target == "cpu"


def test_stage_options_override_the_defaults(project):
    other = project / "data" / "other.npz"
    other.write_bytes(b"")
    path = _write(
        project,
        """
        model: model.py:build
        eval: data/eval.npz
        stages: [export, {prune: {eval_data: data/other.npz, metric: cosine}}]
        """,
    )
    prune = load_recipe(path).stages[1].config
    assert prune.eval_data.path == project.resolve() / "data" / "other.npz"
    assert prune.metric is Metric.COSINE


def test_repeated_stages_get_numbered_names(project, classifier_path):
    path = _write(project, f"model: {classifier_path}\nstages: [simplify, {{prune: {{sparsity: 0.2}}}}, prune]\n")
    recipe = load_recipe(path)
    assert [s.name for s in recipe.stages] == ["simplify", "prune1", "prune2"]
    assert [s.config.sparsity for s in recipe.stages[1:]] == [0.2, 0.5]


def test_default_stages_and_name(project):
    path = _write(project, "model: model.py:build\ncalibration: data/calib.npz\n")
    recipe = load_recipe(path)
    assert [s.kind for s in recipe.stages] == ["export", "simplify", "quantize"]
    assert recipe.name == "run"
    assert recipe.target == "cpu"


def test_builtin_model_needs_no_file(project):
    recipe = load_recipe(_write(project, "model: builtin:digits_cnn\nstages: [export]\n"))
    assert recipe.model == "builtin:digits_cnn"


def test_absolute_paths_are_kept(project, classifier_path):
    recipe = load_recipe(_write(project, f"model: {classifier_path}\nstages: [simplify]\n"))
    assert recipe.model == str(classifier_path)


def test_a_non_onnx_model_needs_an_export_stage(project):
    with pytest.raises(RecipeError, match="export"):
        load_recipe(_write(project, "model: model.py:build\nstages: [simplify]\n"))


def test_to_json_names_every_stage_config(project):
    recipe = load_recipe(_write(
        project,
        "model: model.py:build\ncalibration: data/calib.npz\nstages: [export, {quantize: {tolerance: 2}}]\n",
    ))
    data = recipe.to_json()
    assert [s["kind"] for s in data["stages"]] == ["export", "quantize"]
    assert data["stages"][1]["config"]["tolerance"] == 2.0
    assert data["calibration"].endswith("calib.npz")


class TestConfigFromMapping:
    def test_converts_types(self, tmp_path):
        config = config_from_mapping(
            MagnitudePruneConfig,
            {"sparsity": 1 / 4, "scope": "per-layer", "exclude_nodes": ["a", "b"], "min_params": 10},
            "prune",
        )
        assert config == MagnitudePruneConfig(sparsity=0.25, exclude_nodes=("a", "b"), min_params=10)

    def test_tolerance_mapping(self):
        config = config_from_mapping(SimplifyConfig, {"tolerance": {"atol": 1e-3}}, "simplify")
        assert config.tolerance == Tolerance(atol=1e-3)

    @pytest.mark.parametrize(
        ("values", "fragment"),
        [
            ({"sparsty": 0.1}, "unknown key 'sparsty'"),
            ({"sparsity": "a lot"}, "expected a number"),
            ({"sparsity": True}, "expected a number"),
            ({"min_params": 1.5}, "expected an integer"),
            ({"scope": "everything"}, "not one of"),
            ({"exclude_nodes": "conv"}, "expected a list"),
            ({"eval_data": "missing.npz"}, "does not exist"),
            ({"sparsity": 1.0}, "sparsity"),
        ],
    )
    def test_rejects_with_the_key_named(self, tmp_path, values, fragment):
        with pytest.raises(RecipeError, match=fragment) as info:
            config_from_mapping(MagnitudePruneConfig, values, "stages[0].prune", tmp_path)
        assert info.value.message.startswith("stages[0].prune")
        assert info.value.exit_code == 2

    def test_options_must_be_a_mapping(self):
        with pytest.raises(RecipeError, match="mapping"):
            config_from_mapping(SimplifyConfig, ["onnxsim"], "simplify")
