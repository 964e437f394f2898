"""Merge blocks on tiny graphs, each checked numerically: the merged graph (onnxruntime) against the
same math written out here in numpy, and the library's own step-by-step parity report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import make_classifier, run_model, save
from onnx.reference import ReferenceEvaluator
from onnx_graphs import model_from_text

from onnxforge.errors import MergeError
from onnxforge.pipeline.merge import (
    AudioPre,
    ImageLayout,
    ImagePre,
    MergeConfig,
    PixelLayout,
    PostKind,
    ResizeMode,
    merge,
)
from onnxforge.pipeline.merge.preprocess import _resize_axis


def identity(shape: str, dtype: str = "float") -> onnx.ModelProto:
    """y = x: the merged graph's output is then exactly what the pre-processing produced."""
    return model_from_text("y = Identity (x)", {}, f"{dtype}[{shape}] x", f"{dtype}[{shape}] y")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def onnx_resize(x: np.ndarray, size: tuple[int, int], mode: str, spatial: tuple[int, int]) -> np.ndarray:
    """ONNX's own reference Resize (half_pixel), an implementation independent of onnxforge's numpy one."""
    sizes = list(x.shape)
    for axis, length in zip(spatial, size, strict=False):
        sizes[axis] = length
    node = onnx.helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode,
                                 coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor")
    return ReferenceEvaluator(node).run(None, {"x": x, "sizes": np.array(sizes, np.int64)})[0]


# ----------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("layout", list(PixelLayout))
@pytest.mark.parametrize("batched", [True, False])
def test_image_pre_scales_normalizes_and_lays_out_like_numpy(tmp_path, layout, batched):
    network = save(identity("N,3,8,8"), tmp_path / "id.onnx")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pre = ImagePre(layout=layout, batched=batched, mean=mean, std=std)
    result = merge(network, tmp_path / "m.onnx", MergeConfig(pre=pre))
    assert result.parity.ok, result.parity.summary()
    raw_shape = (8, 8, 3) if layout is PixelLayout.HWC else (3, 8, 8)
    assert result.inputs[0].dtype == np.uint8
    assert result.inputs[0].shape == (("N", *raw_shape) if batched else raw_shape)

    images = np.random.default_rng(1).integers(0, 256, size=(2, *raw_shape), dtype=np.uint8)
    nchw = images.transpose(0, 3, 1, 2) if layout is PixelLayout.HWC else images
    expected = (nchw / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    got = (run_model(result.path, {"x": images})[0] if batched
           else np.concatenate([run_model(result.path, {"x": image})[0] for image in images]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_image_pre_feeds_an_nhwc_network(tmp_path):
    network = save(identity("N,8,8,3"), tmp_path / "id.onnx")
    result = merge(network, tmp_path / "m.onnx",
                   MergeConfig(pre=ImagePre(layout=PixelLayout.CHW, network_layout=ImageLayout.NHWC)))
    images = np.random.default_rng(2).integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)
    expected = images.transpose(0, 2, 3, 1) / 255.0
    np.testing.assert_allclose(run_model(result.path, {"x": images})[0], expected, atol=1e-6)


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize("raw_size", [(5, 6), (13, 19)])  # upsampling and downsampling to 8x8
def test_resize_matches_onnx_reference(tmp_path, mode, raw_size):
    network = save(identity("N,1,8,8"), tmp_path / "id.onnx")
    result = merge(network, tmp_path / "m.onnx", MergeConfig(pre=ImagePre(size=raw_size, resize=mode, scale=1.0)))
    assert result.parity.ok and "resize to 8x8" in result.blocks[0]
    images = np.random.default_rng(3).integers(0, 256, size=(2, *raw_size, 1), dtype=np.uint8)
    nchw = images.transpose(0, 3, 1, 2).astype(np.float32)
    expected = onnx_resize(nchw, (8, 8), mode.value, (2, 3))
    np.testing.assert_allclose(run_model(result.path, {"x": images})[0], expected, atol=1e-3)
    # the numpy steps the parity check replays agree with onnx's reference too
    ours = _resize_axis(_resize_axis(nchw.astype(np.float64), 2, 8, mode), 3, 8, mode)
    np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_dynamic_size_input_takes_any_size(tmp_path):
    network = save(make_classifier(), tmp_path / "cnn.onnx")
    result = merge(network, tmp_path / "m.onnx", MergeConfig(pre=ImagePre(dynamic_size=True), post=PostKind.ARGMAX))
    assert result.inputs[0].shape == ("N", "height", "width", 3)
    assert result.parity.ok and len(result.parity_inputs) == 2  # checked at two raw sizes
    for h, w in ((8, 8), (31, 17)):
        label, score = run_model(result.path, {"x": np.zeros((4, h, w, 3), np.uint8)})
        assert label.shape == (4,) and label.dtype == np.int64 and score.shape == (4,)


def test_image_pre_then_classifier_equals_classifier_on_floats(tmp_path):
    network = save(make_classifier(), tmp_path / "cnn.onnx")
    result = merge(network, tmp_path / "m.onnx", MergeConfig(pre=ImagePre()))
    images = np.random.default_rng(4).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    floats = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    np.testing.assert_allclose(run_model(result.path, {"x": images})[0], run_model(network, {"x": floats})[0],
                               atol=1e-5, rtol=1e-5)
    # standard ONNX only: plain onnxruntime runs it, and no note asks for the extensions library
    assert {n.domain for n in onnx.load(str(result.path)).graph.node} <= {""}
    assert not any("onnxruntime-extensions" in n for n in result.notes)


@pytest.mark.parametrize(("pre", "fragment"), [
    (dict(mean=(0.1, 0.2)), "2 values"),
    (dict(input="missing"), "no input 'missing'"),
])
def test_image_pre_that_does_not_fit_the_model_is_a_merge_error(tmp_path, pre, fragment):
    network = save(make_classifier(), tmp_path / "cnn.onnx")
    with pytest.raises(MergeError, match=fragment):
        merge(network, tmp_path / "m.onnx", MergeConfig(pre=ImagePre(**pre)))
    assert not (tmp_path / "m.onnx").exists()


def test_image_options_are_checked_when_built():
    with pytest.raises(MergeError, match="fixed size or a dynamic size"):
        ImagePre(size=(8, 8), dynamic_size=True)
    with pytest.raises(MergeError, match="non-zero"):
        ImagePre(std=(0.0,))


# ----------------------------------------------------------------------------------------------
# Audio


def test_audio_pre_maps_int16_full_scale_to_minus_one_one(tmp_path):
    network = save(identity("N,400"), tmp_path / "id.onnx")
    result = merge(network, tmp_path / "m.onnx", MergeConfig(pre=AudioPre()))
    assert result.inputs[0].dtype == np.int16 and result.parity.ok
    samples = np.array([[-32768, -1, 0, 1, 16384, 32767] * 66 + [0, 0, 0, 0]], np.int16)
    np.testing.assert_array_equal(run_model(result.path, {"x": samples})[0], samples.astype(np.float32) / 32768)


@pytest.mark.parametrize(("name", "pre", "shape", "dtype"), [
    ("pixels", ImagePre(), "N,3,8,8", np.uint8),  # the image block's own output was called "pixels"
    ("multiplier", ImagePre(dynamic_size=True), "N,3,8,8", np.uint8),  # ... and its constants had plain names
    ("samples", AudioPre(), "N,400", np.int16),  # the audio block's output was called "samples"
])
def test_a_network_input_named_like_a_step_of_the_block_still_merges(tmp_path, name, pre, shape, dtype):
    net = model_from_text(f"y = Identity ({name})", {}, f"float[{shape}] {name}", f"float[{shape}] y")
    result = merge(save(net, tmp_path / "id.onnx"), tmp_path / "m.onnx", MergeConfig(pre=pre))
    assert result.parity.ok, result.parity.summary()
    assert [(s.name, s.dtype) for s in result.inputs] == [(name, np.dtype(dtype))]


# ----------------------------------------------------------------------------------------------
# Post-processing


@pytest.fixture
def logits_model(tmp_path):
    return save(make_classifier(), tmp_path / "cnn.onnx")


@pytest.fixture
def images():
    return np.random.default_rng(5).standard_normal((6, 3, 8, 8)).astype(np.float32)


def test_softmax(tmp_path, logits_model, images):
    result = merge(logits_model, tmp_path / "m.onnx", MergeConfig(post=PostKind.SOFTMAX))
    assert [o.name for o in result.outputs] == ["probabilities"] and result.parity.ok
    logits = run_model(logits_model, {"x": images})[0].astype(np.float64)
    np.testing.assert_allclose(run_model(result.path, {"x": images})[0], softmax(logits), atol=1e-6)


def test_topk_gives_labels_and_scores_best_first(tmp_path, logits_model, images):
    result = merge(logits_model, tmp_path / "m.onnx", MergeConfig(post=PostKind.TOPK, top_k=3))
    labels, scores = run_model(result.path, {"x": images})
    p = softmax(run_model(logits_model, {"x": images})[0].astype(np.float64))
    expected = np.argsort(-p, axis=1)[:, :3]
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(p, expected, 1), atol=1e-6)
    assert labels.dtype == np.int64 and labels.shape == (6, 3)


def test_argmax_without_softmax_scores_the_raw_outputs(tmp_path, logits_model, images):
    result = merge(logits_model, tmp_path / "m.onnx", MergeConfig(post=PostKind.ARGMAX, softmax=False))
    label, score = run_model(result.path, {"x": images})
    logits = run_model(logits_model, {"x": images})[0]
    np.testing.assert_array_equal(label, logits.argmax(1))
    np.testing.assert_allclose(score, logits.max(1), atol=1e-6)


def test_a_network_ending_in_softmax_gets_no_second_one(tmp_path):
    model = model_from_text("y = Softmax <axis = -1> (x)", {}, "float[N,4] x", "float[N,4] y")
    result = merge(save(model, tmp_path / "sm.onnx"), tmp_path / "m.onnx", MergeConfig(post=PostKind.ARGMAX))
    x = np.array([[0.0, 3.0, 1.0, 2.0]], np.float32)
    label, score = run_model(result.path, {"x": x})
    assert label[0] == 1 and score[0] == pytest.approx(softmax(x.astype(np.float64))[0, 1], abs=1e-6)
    assert any("already comes out of a Softmax" in n for n in result.notes)


def test_topk_larger_than_the_classes_is_a_merge_error(tmp_path, logits_model):
    with pytest.raises(MergeError, match="only 5 classes"):
        merge(logits_model, tmp_path / "m.onnx", MergeConfig(post=PostKind.TOPK, top_k=6))


def token_model(tmp_path) -> onnx.ModelProto:
    """A BERT-shaped toy: token states = embedding[input_ids] + 0.5 * type_embedding[token_type_ids]."""
    rng = np.random.default_rng(6)
    model = model_from_text(
        """
        words = Gather (word_table, input_ids)
        types = Gather (type_table, token_type_ids)
        half = Mul (types, half_weight)
        states = Add (words, half)
        """,
        {"word_table": rng.standard_normal((16, 4)).astype(np.float32),
         "type_table": rng.standard_normal((2, 4)).astype(np.float32),
         "half_weight": np.array(0.5, np.float32)},
        "int64[batch,tokens] input_ids, int64[batch,tokens] attention_mask, int64[batch,tokens] token_type_ids",
        "float[batch,tokens,4] states",
    )
    return model


def test_mean_pool_l2_weights_tokens_by_the_mask(tmp_path):
    network = save(token_model(tmp_path), tmp_path / "tokens.onnx")
    result = merge(network, tmp_path / "m.onnx", MergeConfig(post=PostKind.MEAN_POOL_L2))
    assert [s.name for s in result.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in result.outputs] == ["embedding"] and result.parity.ok
    feeds = {"input_ids": np.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]], np.int64),
             "attention_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.int64),
             "token_type_ids": np.zeros((2, 5), np.int64)}
    states = run_model(network, feeds)[0].astype(np.float64)
    mask = feeds["attention_mask"][..., None]
    pooled = (states * mask).sum(1) / mask.sum(1)
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(run_model(result.path, feeds)[0], expected, atol=1e-6)


def test_mean_pool_without_a_mask_input_is_a_merge_error(tmp_path):
    network = save(identity("N,3,4"), tmp_path / "id.onnx")
    with pytest.raises(MergeError, match="attention mask"):
        merge(network, tmp_path / "m.onnx", MergeConfig(post=PostKind.MEAN_POOL_L2))


# ----------------------------------------------------------------------------------------------
# Name clashes: prefixes keep blocks apart


def _clashing_model(tmp_path, edge: str):
    """x[N,1,4,4] -> f[N,16], f = flatten(3x), with an internal value named ``edge``."""
    model = model_from_text(
        """
        doubled = Mul (x, two)
        tripled = Add (doubled, x)
        f = Flatten <axis = 1> (tripled)
        """,
        {"two": np.array(2.0, np.float32)}, "float[N,1,4,4] x", "float[N,16] f")
    for node in model.graph.node:
        node.output[:] = [edge if o == "doubled" else o for o in node.output]
        node.input[:] = [edge if i == "doubled" else i for i in node.input]
    onnx.checker.check_model(model)
    return save(model, tmp_path / "clash.onnx")


def _check_3x_softmax(path, softmaxed=True):
    images = np.random.default_rng(7).integers(0, 256, size=(2, 4, 4, 1), dtype=np.uint8)
    x = (3 * images.transpose(0, 3, 1, 2).astype(np.float64) / 255).reshape(2, 16)
    np.testing.assert_allclose(run_model(path, {"x": images})[0], softmax(x) if softmaxed else x, atol=1e-6)


def test_an_output_name_used_inside_the_model_stays_the_outputs_name(tmp_path):
    network = _clashing_model(tmp_path, "probabilities")
    result = merge(network, tmp_path / "m.onnx", MergeConfig(pre=ImagePre(), post=PostKind.SOFTMAX))
    assert result.parity.ok
    # the interface keeps its names: the model's internal 'probabilities' is what gets a prefix
    assert [o.name for o in result.outputs] == ["probabilities"] and result.renamed == {}
    assert any("internal value(s) probabilities renamed net/" in n for n in result.notes)
    assert "net/probabilities" in {o for node in onnx.load(str(result.path)).graph.node for o in node.output}
    _check_3x_softmax(result.path)


def test_a_block_prefix_used_inside_the_model_moves_to_the_next_free_one(tmp_path):
    network = _clashing_model(tmp_path, "pre/x/pixels")  # the image block's output for input x, prefixed
    result = merge(network, tmp_path / "m.onnx", MergeConfig(pre=ImagePre()))
    values = {o for node in onnx.load(str(result.path)).graph.node for o in node.output}
    assert "pre/x/pixels" in values and "pre_1/x/pixels" in values and result.parity.ok
    _check_3x_softmax(result.path, softmaxed=False)


def test_a_block_name_that_is_one_of_the_models_own_outputs_gets_the_prefix(tmp_path):
    # the model's output is already called 'label' (and kept), so argmax's 'label' gives way
    model = model_from_text("logits = Identity (x)\nlabel = ArgMax <axis = 1, keepdims = 0> (x)", {},
                            "float[N,4] x", "float[N,4] logits, int64[N] label")
    result = merge(save(model, tmp_path / "two.onnx"), tmp_path / "m.onnx", MergeConfig(post=PostKind.ARGMAX))
    assert [o.name for o in result.outputs] == ["label", "post/label", "post/score"]
    assert result.renamed == {"label": "post/label", "score": "post/score"} and result.parity.ok
    x = np.array([[0.0, 2.0, 1.0, 3.0]], np.float32)
    own, label, score = run_model(result.path, {"x": x})
    assert own[0] == 3 and label[0] == 3 and score[0] == pytest.approx(softmax(x.astype(np.float64))[0, 3])


def test_old_opsets_are_refused_with_a_hint(tmp_path):
    old = onnx.helper.make_model(identity("N,3").graph, opset_imports=[onnx.helper.make_opsetid("", 11)], ir_version=7)
    with pytest.raises(MergeError, match="opset 11") as info:
        merge(save(old, tmp_path / "old.onnx"), tmp_path / "m.onnx", MergeConfig(post=PostKind.SOFTMAX))
    assert "--opset" in info.value.hint
