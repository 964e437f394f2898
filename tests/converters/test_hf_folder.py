"""A Hugging Face save_pretrained folder as an export source: tiny random-init BERT and DistilBERT
(hidden 32, 2 layers) exported by the command, by a recipe and by the Python API, then run by
onnxruntime at a batch and length the export never saw and compared with transformers itself."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from onnxforge.converters.config import ExportConfig, HfTask  # noqa: E402
from onnxforge.converters.hf_folder import infer_task  # noqa: E402

VOCAB = 100


def _bert_classifier():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                     architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _distilbert():
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64)
    torch.manual_seed(1)
    return transformers.DistilBertModel(config).eval()


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    _bert_classifier().save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def _io(path):
    model = onnx.load(str(path))
    return {v.name: (onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type),
                     [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*model.graph.input, *model.graph.output]}


def _text_feeds(batch, length, names, id_dtype=np.int64, seed=3):
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, VOCAB, (batch, length)).astype(id_dtype),
             "attention_mask": np.ones((batch, length), np.int64),
             "token_type_ids": rng.integers(0, 2, (batch, length)).astype(np.int64)}
    feeds["attention_mask"][-1, length // 2:] = 0  # a padded row
    return {k: v for k, v in feeds.items() if k in names}


def _transformers_output(model, feeds, key):
    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v).long() for k, v in feeds.items()})
    return out[key].numpy()


def _onnx_output(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_architectures_name_the_task():
    assert infer_task(["BertModel"]) is HfTask.FEATURE_EXTRACTION
    assert infer_task(["DistilBertForSequenceClassification"]) is HfTask.TEXT_CLASSIFICATION
    assert infer_task(["RobertaForTokenClassification"]) is HfTask.TOKEN_CLASSIFICATION
    assert infer_task(["BertForQuestionAnswering"]) is HfTask.QUESTION_ANSWERING
    assert infer_task(["BertForMaskedLM"]) is HfTask.FILL_MASK
    assert infer_task(["BertForPreTraining"]) is None
    assert infer_task([]) is None


def test_export_command_reads_the_folder_and_keeps_batch_and_sequence_dynamic(cli, bert_folder, tmp_path):
    out, report = tmp_path / "bert.onnx", tmp_path / "bert.json"
    code, _, err = cli("export", bert_folder, "-o", out, "--json", report)
    assert code == 0, err
    result = json.loads(report.read_text())
    assert result["verified"] is True and result["source_kind"] == "transformers"
    assert "text-classification" in " ".join(result["notes"])
    io = _io(out)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert io[name] == (np.int64, ["batch", "sequence"])
    assert io["logits"] == (np.float32, ["batch", 3])
    # the check ran two batch sizes and two sequence lengths
    assert result["parity"]["batch_sizes"] == [1, 3]
    lengths = {part.split(",")[0].split("x")[-1] for part in result["parity_inputs"]}
    assert len(lengths) == 2, result["parity_inputs"]

    feeds = _text_feeds(5, 23, ("input_ids", "attention_mask", "token_type_ids"))
    expected = _transformers_output(_bert_classifier(), feeds, "logits")
    np.testing.assert_allclose(_onnx_output(out, feeds), expected, atol=1e-4, rtol=1e-3)


def test_recipe_model_folder_with_inputs_dtype_and_dims(cli, tmp_path):
    folder = tmp_path / "distilbert"
    _distilbert().save_pretrained(folder)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {folder}\n"
        "inputs:\n"
        "  input_ids: {dtype: int32, dynamic: {0: batch, 1: sequence}}\n"
        "stages: [export]\n"
    )
    code, _, err = cli("run", recipe, "-o", tmp_path / "run", "--no-cache")
    assert code == 0, err
    exported = tmp_path / "run" / "01_export.onnx"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    (stage,) = manifest["stages"]
    assert stage["metrics"]["latency_p50_ms"] > 0  # timed at the shapes it was traced with: none were given
    io = _io(exported)
    assert "token_type_ids" not in io  # DistilBERT's forward takes none
    assert io["input_ids"] == (np.int32, ["batch", "sequence"])
    assert io["attention_mask"] == (np.int64, ["batch", "sequence"])
    assert io["last_hidden_state"] == (np.float32, ["batch", "sequence", 32])

    feeds = _text_feeds(4, 9, ("input_ids", "attention_mask"), id_dtype=np.int32)
    expected = _transformers_output(_distilbert(), feeds, "last_hidden_state")
    np.testing.assert_allclose(_onnx_output(exported, feeds), expected, atol=1e-4, rtol=1e-3)


def test_python_api_with_a_task_and_pytorch_model_bin(tmp_path):
    import onnxforge

    model = _bert_classifier()
    folder = tmp_path / "bert-bin"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    out = tmp_path / "features.onnx"
    result = onnxforge.export(folder, out, ExportConfig(task=HfTask.FEATURE_EXTRACTION))
    assert result.verified
    assert [o.name for o in result.outputs] == ["last_hidden_state"]
    feeds = _text_feeds(2, 6, ("input_ids", "attention_mask", "token_type_ids"))
    expected = _transformers_output(model.bert, feeds, "last_hidden_state")
    np.testing.assert_allclose(_onnx_output(out, feeds), expected, atol=1e-4, rtol=1e-3)


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines and lines[0].startswith("error:"), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint:")), err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_folders_are_one_line_errors(cli, bert_folder, tmp_path):
    out = tmp_path / "x.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli("export", empty, "-o", out)
    assert code == 2
    _one_error(err, "config.json")

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((bert_folder / "config.json").read_text())
    code, _, err = cli("export", no_weights, "-o", out)
    assert code == 2
    _one_error(err, "no weights")

    pretraining = tmp_path / "pretraining"
    pretraining.mkdir()
    config = json.loads((bert_folder / "config.json").read_text()) | {"architectures": ["BertForPreTraining"]}
    (pretraining / "config.json").write_text(json.dumps(config))
    (pretraining / "model.safetensors").write_bytes((bert_folder / "model.safetensors").read_bytes())
    code, _, err = cli("export", pretraining, "-o", out)
    assert code == 2
    _one_error(err, "BertForPreTraining", "--task", "feature-extraction", "text-classification")

    code, _, err = cli("export", bert_folder, "-o", out, "--task", "summarization")
    assert code == 2
    _one_error(err, "summarization", "fill-mask")

    code, _, err = cli("export", "builtin:digits_cnn", "-o", out, "--task", "fill-mask")
    assert code == 2
    _one_error(err, "Hugging Face model folder")
    assert not out.exists()


def test_pickled_weights_never_run(cli, bert_folder, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((bert_folder / "config.json").read_text())
    marker = tmp_path / "ran"
    weights = {"bert.embeddings.word_embeddings.weight": _Payload(marker)}
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(weights))
    code, _, err = cli("export", folder, "-o", tmp_path / "x.onnx")
    assert code == 2
    _one_error(err, str(folder))
    assert not marker.exists()
