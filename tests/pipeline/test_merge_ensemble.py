"""Ensembles, the tokenizer in the graph, parity failures and the config's recipe spelling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_classifier, random_images, run_model, save, write_npz
from onnx_graphs import model_from_text

from onnxforge.errors import MergeError, QualityGateError, RecipeError, UsageError
from onnxforge.pipeline import codec
from onnxforge.pipeline.merge import (
    AudioPre,
    EnsembleMode,
    ImagePre,
    MergeConfig,
    PixelLayout,
    PostKind,
    TokenizerConfig,
    merge,
)


@pytest.fixture
def members(tmp_path):
    return [save(make_classifier(seed), tmp_path / f"cnn{seed}.onnx") for seed in (0, 1, 2)]


@pytest.fixture
def labelled(tmp_path, members):
    """Images labelled by member 0 except every third sample: members and ensemble score differently."""
    images = np.clip(random_images(60, seed=8) * 0.3 + 0.5, 0, 1).astype(np.float32)
    labels = run_model(members[0], {"x": images})[0].argmax(1)
    labels[::3] = (labels[::3] + 1) % 5
    return images, labels, write_npz(tmp_path / "eval.npz", x=images, label=labels)


def test_mean_ensemble_averages_every_output(tmp_path, members):
    result = merge(members[:2], tmp_path / "e.onnx", MergeConfig(ensemble=EnsembleMode.MEAN))
    assert result.parity.ok and result.blocks == ["mean of 2 models"]
    x = random_images(4, seed=9)
    expected = (run_model(members[0], {"x": x})[0] + run_model(members[1], {"x": x})[0]) / 2
    np.testing.assert_allclose(run_model(result.path, {"x": x})[0], expected, atol=1e-6)


def test_vote_counts_argmax_ballots_and_breaks_ties_by_the_lower_class(tmp_path, members):
    result = merge(members[:2], tmp_path / "v.onnx", MergeConfig(ensemble=EnsembleMode.VOTE))
    assert [o.name for o in result.outputs] == ["votes", "label"] and result.parity.ok
    x = random_images(64, seed=10)
    choices = [run_model(m, {"x": x})[0].argmax(1) for m in members[:2]]
    votes, label = run_model(result.path, {"x": x})
    expected_votes = np.eye(5)[choices[0]] + np.eye(5)[choices[1]]
    np.testing.assert_array_equal(votes, expected_votes)
    assert (choices[0] != choices[1]).any()  # some ties: two members disagreeing
    np.testing.assert_array_equal(label, np.where(choices[0] == choices[1], choices[0], np.minimum(*choices)))


def test_accuracy_of_each_member_and_of_the_ensemble(tmp_path, members, labelled):
    images, labels, eval_npz = labelled
    result = merge(members, tmp_path / "e.onnx",
                   MergeConfig(ensemble=EnsembleMode.VOTE, pre=ImagePre(), eval_data=eval_npz))
    accuracy = result.accuracy
    for path, name in zip(members, ("cnn0.onnx", "cnn1.onnx", "cnn2.onnx"), strict=False):
        expected = (run_model(path, {"x": images})[0].argmax(1) == labels).mean()
        assert accuracy["members"][name] == pytest.approx(expected)
    assert accuracy["members"]["cnn0.onnx"] == pytest.approx(40 / 60)
    raw = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert accuracy["merged"] == pytest.approx((run_model(result.path, {"x": raw})[1] == labels).mean())
    assert accuracy["samples"] == 60 and result.metrics == {"accuracy": accuracy["merged"]}
    assert any(p.startswith("eval:") for p in result.parity_inputs)  # parity also on the eval images


def test_the_same_model_twice_does_not_clash(tmp_path, members):
    copy = tmp_path / "other" / "cnn0.onnx"
    copy.parent.mkdir()
    copy.write_bytes(members[0].read_bytes())
    result = merge([members[0], copy], tmp_path / "e.onnx", MergeConfig(post=PostKind.ARGMAX))
    x = random_images(3, seed=11)
    np.testing.assert_array_equal(run_model(result.path, {"x": x})[0], run_model(members[0], {"x": x})[0].argmax(1))


def _other_input(tmp_path, name="x", channels=3):
    model = model_from_text(
        f"""
        f = Flatten <axis = 1> ({name})
        logits = MatMul (f, w)
        """,
        {"w": np.ones((channels * 64, 5), np.float32)}, f"float[N,{channels},8,8] {name}", "float[N,5] logits")
    return save(model, tmp_path / f"{name}{channels}.onnx")


@pytest.mark.parametrize(("other", "fragment"), [
    (dict(name="image"), "take different inputs: cnn0.onnx takes x, image3.onnx takes image"),
    (dict(channels=1), "input 'x' differs: cnn0.onnx has x float32[Nx3x8x8], x1.onnx has x float32[Nx1x8x8]"),
])
def test_members_with_other_inputs_are_a_merge_error(tmp_path, members, other, fragment):
    with pytest.raises(MergeError) as info:
        merge([members[0], _other_input(tmp_path, **other)], tmp_path / "e.onnx", MergeConfig())
    assert fragment in info.value.message and info.value.exit_code == 2
    assert not (tmp_path / "e.onnx").exists()


def test_members_whose_outputs_cannot_be_combined_are_a_merge_error(tmp_path, members):
    two = model_from_text("a = Identity (x)\nb = Identity (x)", {}, "float[N,3,8,8] x",
                          "float[N,3,8,8] a, float[N,3,8,8] b")
    with pytest.raises(MergeError, match="give 1 and 2 outputs"):
        merge([members[0], save(two, tmp_path / "two.onnx")], tmp_path / "e.onnx", MergeConfig())
    flat = model_from_text("y = Identity (x)", {}, "float[N,3,8,8] x", "float[N,3,8,8] y")
    with pytest.raises(MergeError, match="vote needs class scores"):
        merge([save(flat, tmp_path / "a.onnx"), save(flat, tmp_path / "b.onnx")], tmp_path / "e.onnx",
              MergeConfig(ensemble=EnsembleMode.VOTE))


def test_a_vote_takes_no_post_processing(tmp_path, members):
    with pytest.raises(MergeError, match="vote already gives the label"):
        merge(members[:2], tmp_path / "e.onnx", MergeConfig(ensemble=EnsembleMode.VOTE, post=PostKind.SOFTMAX))


# ----------------------------------------------------------------------------------------------
# Parity failure: the file is kept, marked unverified, exit 4


def test_a_parity_failure_keeps_the_file_and_raises_a_quality_gate(tmp_path, members, monkeypatch):
    from onnxforge.pipeline.merge.postprocess import PostPlan

    real = PostPlan.reference
    monkeypatch.setattr(PostPlan, "reference", lambda self, x, mask=None: [o + 1 for o in real(self, x, mask)])
    out = tmp_path / "m.onnx"
    with pytest.raises(QualityGateError, match="UNVERIFIED") as info:
        merge(members[0], out, MergeConfig(post=PostKind.SOFTMAX))
    assert info.value.exit_code == 4 and info.value.best_path == str(out)
    assert out.exists()
    note = json.loads((tmp_path / "m.onnx.unverified.json").read_text())
    assert note["verified"] is False and note["parity"]["ok"] is False
    monkeypatch.setattr(PostPlan, "reference", real)
    assert merge(members[0], out, MergeConfig(post=PostKind.SOFTMAX)).verified
    assert not (tmp_path / "m.onnx.unverified.json").exists()  # a verified merge removes the stale note


# ----------------------------------------------------------------------------------------------
# The tokenizer in the graph (a toy BERT and a toy vocabulary; MiniLM is benchmarks/merge_minilm.py)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", ".", "##s", "a", "dog"]


def toy_bert(folder):
    rng = np.random.default_rng(12)
    model = model_from_text(
        """
        words = Gather (word_table, input_ids)
        types = Gather (type_table, token_type_ids)
        states = Add (words, types)
        """,
        {"word_table": rng.standard_normal((len(VOCAB), 4)).astype(np.float32),
         "type_table": rng.standard_normal((2, 4)).astype(np.float32)},
        "int64[batch,tokens] input_ids, int64[batch,tokens] attention_mask, int64[batch,tokens] token_type_ids",
        "float[batch,tokens,4] states")
    folder.mkdir(exist_ok=True)
    return save(model, folder / "bert.onnx")


def test_tokenizer_in_the_graph_turns_text_into_an_embedding(tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    from onnxforge.pipeline.merge.check import session

    network = toy_bert(tmp_path / "model")
    (tmp_path / "model" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")  # shipped beside the model
    config = MergeConfig(tokenizer=TokenizerConfig(), post=PostKind.MEAN_POOL_L2)
    result = merge(network, tmp_path / "text.onnx", config)
    assert result.parity.ok, result.parity.summary()
    assert [(s.name, s.shape) for s in result.inputs] == [("text", (1,))]
    assert result.blocks[0] == "tokenizer (vocab.txt, 14 tokens)"
    assert any("onnxruntime-extensions' custom ops" in n for n in result.notes)  # the deployer is told
    text = np.array(["The cats sat on a MAT."], dtype=object)
    got = session(result.path, extensions=True).run(None, {"text": text})[0]
    ids = np.array([[2, 5, 6, 11, 7, 8, 12, 9, 10, 3]])  # [CLS] the cat ##s sat on a mat . [SEP]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    states = run_model(network, feeds)[0]
    pooled = states[0].astype(np.float64).mean(0)
    np.testing.assert_allclose(got[0], pooled / np.linalg.norm(pooled), atol=1e-6)


def test_tokenizer_needs_the_models_vocabulary(tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    network = toy_bert(tmp_path / "model")
    with pytest.raises(MergeError, match="ships no vocabulary") as info:
        merge(network, tmp_path / "text.onnx", MergeConfig(tokenizer=TokenizerConfig()))
    assert "--vocab" in info.value.hint
    not_bert = tmp_path / "words.txt"
    not_bert.write_text("hello\nworld\n")
    with pytest.raises(MergeError, match="not a BERT vocabulary"):
        merge(network, tmp_path / "text.onnx", MergeConfig(tokenizer=TokenizerConfig(vocab=not_bert)))


def test_tokenizer_feeds_only_bert_style_models(tmp_path, members):
    with pytest.raises(MergeError, match="BERT-style inputs"):
        merge(members[0], tmp_path / "t.onnx", MergeConfig(tokenizer=TokenizerConfig()))


def test_without_onnxruntime_extensions_the_tokenizer_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # as if not installed
    network = toy_bert(tmp_path / "model")
    with pytest.raises(UsageError, match="needs onnxruntime-extensions") as info:
        merge(network, tmp_path / "t.onnx", MergeConfig(tokenizer=TokenizerConfig()))
    assert info.value.hint == "pip install 'onnxforge[tokenizer]'"


# ----------------------------------------------------------------------------------------------
# The config: recipe spelling, round trips, unknown options


@pytest.mark.parametrize("config", [
    MergeConfig(pre=AudioPre(scale=0.5)),
    MergeConfig(pre=ImagePre(layout=PixelLayout.CHW, size=(16, 12), mean=(0.5, 0.4, 0.3)), post=PostKind.TOPK, top_k=2),
    MergeConfig(tokenizer=TokenizerConfig(lowercase=False, max_length=128), post=PostKind.MEAN_POOL_L2),
    MergeConfig(ensemble=EnsembleMode.VOTE),
])
def test_configs_round_trip_through_the_codec(config):
    data = json.loads(json.dumps(codec.encode(config)))
    assert codec.decode(MergeConfig, data) == config


def test_recipe_spelling_names_the_kind_of_pre_processing():
    def decode(data):
        return codec.decode(MergeConfig, data, "stages[4].merge")

    assert decode({"pre": "image"}).pre == ImagePre()
    assert decode({"pre": {"audio": {"scale": 0.25}}}).pre == AudioPre(scale=0.25)
    image = decode({"pre": {"image": {"layout": "chw", "size": [4, 6]}}}).pre
    assert image == ImagePre(layout=PixelLayout.CHW, size=(4, 6))
    with pytest.raises(RecipeError, match=r"stages\[4\].merge.pre: expected image, audio"):
        decode({"pre": {"video": {}}})
    with pytest.raises(RecipeError, match=r"stages\[4\].merge.pre.image: unknown key 'colour'"):
        decode({"pre": {"image": {"colour": "rgb"}}})
    with pytest.raises(RecipeError, match=r"stages\[4\].merge.post: 'sigmoid' is not one of"):
        decode({"post": "sigmoid"})
    with pytest.raises(RecipeError, match="not both"):
        decode({"pre": "image", "tokenizer": {}})


def test_a_single_image_graph_is_measured_one_image_at_a_time(tmp_path, members, labelled):
    eval_npz = labelled[2]
    result = merge(members[0], tmp_path / "one.onnx", MergeConfig(pre=ImagePre(batched=False), eval_data=eval_npz))
    assert result.inputs[0].shape == (8, 8, 3)
    assert result.accuracy["merged"] == result.accuracy["network"] == pytest.approx(40 / 60)
