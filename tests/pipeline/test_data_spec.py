"""Data is one DataSpec everywhere: a recipe's image-folder calibration reaches every stage with its
preprocessing, is opened by one function, and the recipe's ``inputs:`` key types and names the inputs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_classifier, save, sha256

from onnxforge.errors import RecipeError
from onnxforge.model_io import input_specs
from onnxforge.pipeline.calibration import ImagePreprocessing, open_calibration
from onnxforge.pipeline.data_spec import DataKind, DataSpec, data_spec_from_options, load_data, open_data
from onnxforge.pipeline.merge import ImagePre, PixelLayout
from onnxforge.pipeline.prune.channels import ChannelPruneConfig
from onnxforge.pipeline.recipe import load_recipe, recipe_from_mapping
from onnxforge.pipeline.runner import run_recipe


def _images(folder: Path, n: int = 12, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture
def image_project(tmp_path) -> Path:
    save(make_classifier(channels=8), tmp_path / "classifier.onnx")
    _images(tmp_path / "images")
    return tmp_path


def _run(project: Path, stages: str, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), run: str = "run"):
    recipe = project / f"{run}.yaml"
    recipe.write_text(textwrap.dedent(f"""
        model: classifier.onnx
        calibration: {{path: images, mean: {list(mean)}, std: {list(std)}}}
        stages: {stages}
    """))
    return run_recipe(load_recipe(recipe), project / run, measure=False)


def test_an_image_folder_calibrates_prune_channels_low_rank_and_quantize(image_project, int8_faster):
    result = _run(image_project, "[{prune_channels: {ratio: 0.5, round_to: 1, tolerance: 100}}, "
                  "{low_rank: {tolerance: 100, "
                                 "min_params: 16}}, {quantize: {tolerance: 100, latency_rounds: 3}}]")
    assert [s.status for s in result.stages] == ["done", "done", "done"]
    pruned = onnx.load(str(image_project / "run" / "01_prune_channels.onnx"))
    weight = next(n for n in pruned.graph.node if n.op_type == "Conv").input[1]
    conv_w = next(i for i in pruned.graph.initializer if i.name == weight)
    assert conv_w.dims[0] == 4  # half of the 8 channels went, refit on the images
    assert result.stages[0].result["repaired"] is True
    assert result.stages[0].config["calibration_data"]["mean"] == [0.5, 0.5, 0.5]  # the whole DataSpec
    assert result.stages[2].result["calibration_samples"] > 0


def test_the_images_mean_and_std_change_what_prune_channels_computes(image_project):
    stage = "[{prune_channels: {ratio: 0.5, round_to: 1, tolerance: 100}}]"
    a = _run(image_project, stage, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), run="a")
    b = _run(image_project, stage, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), run="b")
    assert a.stages[0].key != b.stages[0].key  # the preprocessing is part of the cache key
    stage_file = "01_prune_channels.onnx"
    assert sha256(image_project / "a" / stage_file) != sha256(image_project / "b" / stage_file)


def test_open_data_reads_images_as_declared(image_project):
    specs = input_specs(make_classifier())
    folder = image_project / "images"
    plain = load_data(folder, specs)  # a folder of images: pixels scaled to [0, 1]
    spec = data_spec_from_options(folder, mean=(0.5,), std=(0.25,))
    assert spec.resolved_kind() is DataKind.IMAGES and spec.image == ImagePreprocessing(mean=(0.5,), std=(0.25,))
    normalized = load_data(spec, specs, limit=3)
    assert len(normalized) == 3 and len(open_data(spec, specs, limit=5)) == 5
    np.testing.assert_allclose(normalized.inputs["x"], (plain.inputs["x"][:3] - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
    # the Python API's paths and DataSpecs open the same way
    streamed = open_calibration(spec, specs, limit=3).take(slice(0, 3)).materialize()
    np.testing.assert_array_equal(streamed.inputs["x"], normalized.inputs["x"])
    assert ChannelPruneConfig(calibration_data=folder).calibration_data == DataSpec(path=folder)
    # the command line's flags as typed: the same spec; --layout auto alone declares nothing
    assert data_spec_from_options(folder, mean="0.5", std="0.25", layout="auto") == spec
    assert data_spec_from_options(folder, layout="auto").image is None
    assert data_spec_from_options(folder, image_size="4x6").image.size == (4, 6)


TOKENS_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            return self.head(self.embed(tokens).mean(dim=1))

    def build():
        torch.manual_seed(0)
        return Bag().eval()
    """
)


def test_inputs_key_exports_int64_inputs_with_named_dynamic_axes(tmp_path):
    (tmp_path / "model.py").write_text(TOKENS_MODEL)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""
        model: model.py:build
        inputs: {tokens: {shape: [2, 7], dtype: int64, dynamic: {0: batch, 1: sequence}}}
        stages: [export]
    """))
    loaded = load_recipe(recipe)
    export = loaded.stages[0].config
    assert export.input_shapes == {"tokens": (2, 7)} and export.input_dtypes == {"tokens": np.dtype("int64")}
    assert export.dynamic_axes == {"tokens": {0: "batch", 1: "sequence"}}
    result = run_recipe(loaded, tmp_path / "run", measure=False)
    assert result.stages[0].verified
    model = onnx.load(str(tmp_path / "run" / "01_export.onnx"))
    tokens = model.graph.input[0]
    assert tokens.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in tokens.type.tensor_type.shape.dim] == ["batch", "sequence"]


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"tokens": {"shape": [2, 7], "dtype": "int65"}}, r"inputs\.tokens: dtype 'int65' is not one of"),
    ({"tokens": {"shape": [2, 7], "colour": 1}}, r"inputs\.tokens: unknown key 'colour'"),
    ({"tokens": {"shape": [2, 7], "dynamic": {2: "sequence"}}}, r"inputs\.tokens: dynamic: axis 2"),
    ({"tokens": [2, 7]}, r"inputs\.tokens: expected a mapping"),
])
def test_a_bad_inputs_entry_is_a_recipe_error_naming_the_key(tmp_path, entry, fragment):
    save(make_classifier(), tmp_path / "classifier.onnx")
    with pytest.raises(RecipeError, match=fragment):
        recipe_from_mapping({"model": "classifier.onnx", "inputs": entry, "stages": ["simplify"]}, tmp_path)


def _merge_recipe(project: Path, pre) -> dict:
    return {"model": "classifier.onnx", "calibration": {"path": "images", "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3},
            "stages": [{"merge": {"pre": pre}}]}


def test_merge_ships_the_normalization_the_images_were_calibrated_with(image_project):
    recipe = recipe_from_mapping(_merge_recipe(image_project, "image"), image_project)
    pre = recipe.stages[0].config.pre
    assert pre.preprocessing == ImagePreprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert pre == ImagePre.from_preprocessing(recipe.calibration.image)
    kept = recipe_from_mapping(_merge_recipe(image_project, {"image": {"layout": "chw", "std": [0.25, 0.25, 0.25]}}),
                               image_project).stages[0].config.pre
    assert kept.layout is PixelLayout.CHW and kept.mean == (0.5, 0.5, 0.5)  # raw-image options stay merge's own
    with pytest.raises(RecipeError, match=r"stages\[0\]\.merge\.pre\.image\.mean: .* differs from the calibration"):
        recipe_from_mapping(_merge_recipe(image_project, {"image": {"mean": [0.1, 0.1, 0.1]}}), image_project)
