"""--input-shape parsing and generated/sampled feeds."""

from __future__ import annotations

import numpy as np
import pytest

from onnxforge.errors import UsageError
from onnxforge.model_io import TensorSpec
from onnxforge.targets.feeds import (
    batch_from_samples,
    generate_feeds,
    parse_input_dtypes,
    parse_input_shapes,
    resolve_shape,
)

IMAGE = TensorSpec("image", ("batch", 3, 8, 8), np.dtype("float32"))
IDS = TensorSpec("input_ids", ("batch", "sequence"), np.dtype("int64"))
MASK = TensorSpec("attention_mask", ("batch", "sequence"), np.dtype("int64"))
FLAG = TensorSpec("flag", (1,), np.dtype("bool"))


def test_parse_shapes_and_dtypes():
    items = ["image=1x3x224x224", "input_ids=2,128:int64", "a=b=4"]
    assert parse_input_shapes(items) == {"image": (1, 3, 224, 224), "input_ids": (2, 128), "a=b": (4,)}
    assert parse_input_dtypes(items) == {"input_ids": np.dtype("int64")}


@pytest.mark.parametrize(
    "item", ["image", "=1x3", "image=", "image=1xAx3", "image=1x0x3", "image=1x-2", "ids=1x4:notatype"]
)
def test_parse_rejects_malformed_items(item):
    with pytest.raises(UsageError, match="--input-shape"):
        parse_input_shapes([item]) if "notatype" not in item else parse_input_dtypes([item])


def test_dynamic_batch_takes_the_batch_size():
    assert resolve_shape(IMAGE, 5, {}) == (5, 3, 8, 8)


def test_other_dynamic_dims_must_be_given():
    with pytest.raises(UsageError, match="sequence") as info:
        resolve_shape(IDS, 1, {})
    assert "--input-shape input_ids=" in info.value.hint
    assert resolve_shape(IDS, 1, {"input_ids": (2, 16)}) == (2, 16)


def test_inputs_sharing_a_dim_name_share_its_given_size():
    feeds = generate_feeds([IDS, MASK], batch=1, overrides={"input_ids": (2, 12)})
    assert feeds["attention_mask"].shape == (2, 12)
    # a dim nobody gave is still an error
    other = TensorSpec("pixel_mask", ("batch", "height"), np.dtype("int64"))
    with pytest.raises(UsageError, match="height"):
        generate_feeds([IDS, other], batch=1, overrides={"input_ids": (1, 12)})


def test_override_must_fit_the_declared_shape():
    with pytest.raises(UsageError, match="rank"):
        resolve_shape(IMAGE, 1, {"image": (1, 3, 8)})
    with pytest.raises(UsageError, match="fixed shape"):
        resolve_shape(IMAGE, 1, {"image": (1, 4, 8, 8)})


def test_generated_feeds_have_the_right_shapes_dtypes_and_are_deterministic():
    specs = [IMAGE, IDS, MASK, FLAG]
    overrides = {"input_ids": (2, 7), "attention_mask": (2, 7)}
    a = generate_feeds(specs, batch=2, overrides=overrides, seed=3)
    b = generate_feeds(specs, batch=2, overrides=overrides, seed=3)
    c = generate_feeds(specs, batch=2, overrides=overrides, seed=4)
    assert a["image"].shape == (2, 3, 8, 8) and a["image"].dtype == np.float32
    assert a["input_ids"].dtype == np.int64 and a["input_ids"].shape == (2, 7)
    assert a["input_ids"].min() >= 0 and a["input_ids"].max() < 100
    assert np.all(a["attention_mask"] == 1)
    assert a["flag"].dtype == bool
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["image"], c["image"])


def test_override_for_an_unknown_input_is_refused():
    with pytest.raises(UsageError, match="'imgae'"):
        generate_feeds([IMAGE], overrides={"imgae": (1, 3, 8, 8)})


def test_string_inputs_cannot_be_generated():
    with pytest.raises(UsageError, match="dtype"):
        generate_feeds([TensorSpec("text", (1,), np.dtype("O"))])


def test_batch_from_samples_takes_or_repeats():
    samples = {"x": np.arange(3 * 2).reshape(3, 2)}
    np.testing.assert_array_equal(batch_from_samples(samples, 2)["x"], [[0, 1], [2, 3]])
    repeated = batch_from_samples(samples, 5)["x"]
    assert repeated.shape == (5, 2)
    np.testing.assert_array_equal(repeated[3:], [[0, 1], [2, 3]])
    assert repeated.flags["C_CONTIGUOUS"]


def test_a_stated_guess_for_dynamic_dims():
    from onnxforge.model_io import TensorSpec
    from onnxforge.targets.feeds import generate_feeds

    image = TensorSpec("x", (None, 3, None, None), np.dtype("float32"))  # PaddleOCR's detector
    tokens = TensorSpec("ids", ("N", "L"), np.dtype("int64"))
    feeds = generate_feeds([image, tokens], batch=2, guess=True)
    assert feeds["x"].shape == (2, 3, 224, 224) and feeds["ids"].shape == (2, 128)
    with pytest.raises(UsageError, match="dynamic dimension 2"):
        generate_feeds([image], batch=1)


def _embedding_model(vocab: int):
    import onnx
    import onnx.numpy_helper
    import onnx.parser

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (int64[batch, 6] input_ids, int64[batch, 6] position) => (float[batch, 6, 4] out) {
            ids = Cast<to = 7>(input_ids)
            out = Gather<axis = 0>(table, ids)
        }""")
    table = np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4)
    model.graph.initializer.append(onnx.numpy_helper.from_array(table, "table"))
    return model


def test_int64_ids_feeding_an_embedding_stay_inside_its_vocabulary(tmp_path, cli):
    from conftest import run_model, save

    from onnxforge.model_io import input_specs

    model = _embedding_model(vocab=7)
    for seed in range(5):
        feeds = generate_feeds(input_specs(model), batch=4, seed=seed, model=model)
        assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 7
        assert feeds["position"].min() >= 0  # not an id of a table: small non-negative values
        run_model(model, feeds)  # onnxruntime would refuse an id outside the table
    path = save(model, tmp_path / "embed.onnx")
    code, _, err = cli("profile", path, "--min-seconds", "0")
    assert code == 0, err


def test_the_measurement_service_times_an_embedding_on_ids_inside_its_vocabulary(tmp_path):
    """Without data, Reference's timing feeds are generated: ids must index the table, or onnxruntime
    refuses them (the runner's run table and the search time through these feeds)."""
    from conftest import save

    from onnxforge.pipeline.reference import Reference

    path = save(_embedding_model(vocab=3), tmp_path / "embed.onnx")
    feeds = Reference(path, None, "cpu").feeds(batch=4)
    assert feeds["input_ids"].max() < 3
