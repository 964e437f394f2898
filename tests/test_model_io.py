"""Loading, checking and saving models, and describing their inputs and outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import assert_numerically_equal, make_classifier, random_images, save
from onnxforge.errors import InvalidModelError
from onnxforge.model_io import (
    default_opset,
    file_sha256,
    input_specs,
    load_model,
    model_file_size,
    output_specs,
    save_model,
)


def test_save_then_load_round_trips(tmp_path, classifier):
    path = save_model(classifier, tmp_path / "m.onnx")
    loaded = load_model(path)
    assert loaded.SerializeToString() == classifier.SerializeToString()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_specs_describe_dynamic_and_fixed_dims(classifier):
    (x,) = input_specs(classifier)
    assert (x.name, x.shape, x.dtype) == ("x", ("N", 3, 8, 8), np.dtype("float32"))
    assert not x.is_static and x.shape_text() == "Nx3x8x8"
    (y,) = output_specs(make_classifier(batch=2))
    assert y.shape == (2, 5) and y.is_static
    assert default_opset(classifier) == 17


def test_initializers_listed_as_inputs_are_not_fed(classifier):
    model = make_classifier()
    model.graph.input.append(onnx.helper.make_tensor_value_info("fc_b", onnx.TensorProto.FLOAT, [5]))
    assert [s.name for s in input_specs(model)] == ["x"]


def test_missing_external_data_is_reported(tmp_path):
    model = make_classifier()
    folder = tmp_path / "ext"
    folder.mkdir()
    # (save_model with external data rewrites ``model`` in place, so compare against a fresh copy)
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = load_model(folder / "m.onnx")
    assert_numerically_equal(make_classifier(), loaded, {"x": random_images(2)})
    assert model_file_size(folder / "m.onnx") == sum(p.stat().st_size for p in folder.iterdir())
    (folder / "m.data").unlink()
    with pytest.raises(InvalidModelError, match="m.data"):
        load_model(folder / "m.onnx")


def test_opset_newer_than_onnx_knows(tmp_path):
    model = make_classifier()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = save(model, tmp_path / "future.onnx")
    with pytest.raises(InvalidModelError, match="newer"):
        load_model(path)


def test_file_sha256_matches_hashlib(tmp_path, classifier_path):
    import hashlib

    assert file_sha256(classifier_path) == hashlib.sha256(classifier_path.read_bytes()).hexdigest()
