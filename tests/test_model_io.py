"""Loading, checking and saving models, and describing their inputs and outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_numerically_equal, make_classifier, random_images, save

from onnxforge.errors import InvalidModelError
from onnxforge.model_io import (
    check_model,
    default_opset,
    file_sha256,
    fits_in_protobuf,
    infer_shapes,
    input_specs,
    load_model,
    model_file_size,
    output_specs,
    runnable,
    save_model,
    serialized_size,
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
    with pytest.raises(InvalidModelError, match=r"m\.data"):
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


# ----------------------------------------------------------------------------------------------
# Past protobuf's 2 GB: the thresholds lowered, so a tiny model takes those paths


@pytest.fixture
def past_2gb(monkeypatch):
    import onnxforge.model_io

    monkeypatch.setattr(onnxforge.model_io, "_PROTOBUF_LIMIT", 1_000)
    monkeypatch.setattr(onnxforge.model_io, "_EXTERNAL_DATA_THRESHOLD", 1_000)


def test_saving_with_external_data_leaves_the_model_as_it_was(tmp_path, past_2gb):
    """onnx.save_model(save_as_external_data=True) clears the caller's tensors; a stage that saves
    and then keeps using its model (or saves it twice) must not find its weights gone."""
    model = make_classifier()
    path = save_model(model, tmp_path / "m.onnx")
    assert model.SerializeToString() == make_classifier().SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    header = onnx.load(str(path), load_external_data=False)
    assert [t.name for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL] == ["fc_w"]
    assert_numerically_equal(make_classifier(), load_model(path), {"x": random_images(2)})


def test_serialized_size_counts_large_weights_without_serializing_them():
    import onnxforge.model_io

    model = make_classifier(channels=256)  # fc_w alone is 1.3 MB
    exact = model.ByteSize()
    assert serialized_size(model) == exact
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnxforge.model_io, "_MEASURED_BYTES", 0)  # count from dims, as past 64 MB of weights
        assert abs(serialized_size(model) - exact) <= 16 * len(model.graph.initializer)


def test_runnable_check_and_shapes_past_the_limit(past_2gb):
    model = make_classifier()
    assert not fits_in_protobuf(model)
    with runnable(model) as source:
        assert isinstance(source, str) and source.endswith(".onnx")
        with runnable(model) as again:
            assert again == source  # one temporary file per model
        assert_numerically_equal(make_classifier(), source, {"x": random_images(2)})
    check_model(model, full_check=True)
    inferred = infer_shapes(model)
    assert {vi.name for vi in inferred.graph.value_info} == {"conv", "act", "flat"}
    assert inferred.graph.initializer[2].raw_data == model.graph.initializer[2].raw_data  # the weights kept
    assert not model.graph.value_info
