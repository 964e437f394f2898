"""Distillation against a Hugging Face folder (a tiny random BERT saved with save_pretrained): the
teacher is the transformers model, the student the pruned graph itself run in torch
(onnxforge.converters.graph_student); training lowers the held-out loss, and padded tokens never
enter the loss."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from onnxforge.converters import ExportConfig, export  # noqa: E402
from onnxforge.converters.distill import DistillConfig, DistillLoss, _output_loss, distill  # noqa: E402
from onnxforge.converters.graph_student import GraphStudent  # noqa: E402
from onnxforge.pipeline.prune.channels import ChannelPruneConfig, Repair, prune_channels  # noqa: E402

VOCAB, TOKENS = 100, 10


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(folder, pruned .onnx, calibration .npz): half the heads and FFN neurons of a tiny BERT cut, no repair."""
    root = tmp_path_factory.mktemp("hf_distill")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.3,
                                     architectures=["BertModel"])
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(root / "bert")
    export(root / "bert", root / "bert.onnx", ExportConfig(dynamic_batch=True))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (96, TOKENS)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate(rng.integers(3, TOKENS + 1, len(ids))):
        mask[row, length:], ids[row, length:] = 0, 0
    np.savez(root / "calib.npz", input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    prune_channels(root / "bert.onnx", root / "pruned.onnx",
                   ChannelPruneConfig(ratio=0.5, head_ratio=0.5, round_to=1, repair=Repair.NONE, gate=False))
    return root / "bert", root / "pruned.onnx", root / "calib.npz"


def test_the_graph_student_is_the_pruned_graph_and_writes_back_what_it_learned(bert):
    _, pruned, calib = bert
    model = onnx.load(str(pruned))
    feeds = dict(np.load(calib))
    student = GraphStudent(model)
    with torch.no_grad():
        ours = student(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ours, session.run(None, feeds)[0], atol=1e-4)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)
        changed = student(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    written = ort.InferenceSession(student.trained_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(written.run(None, feeds)[0], changed, atol=1e-4)
    assert not np.allclose(changed, ours, atol=1e-3)


def test_distilling_against_the_transformers_model_lowers_the_held_out_loss(bert, tmp_path):
    folder, pruned, calib = bert
    result = distill(folder, pruned, tmp_path / "out.onnx",
                     DistillConfig(calibration_data=calib, epochs=6, learning_rate=3e-3, batch_size=16, patience=6))
    assert result.parity_before["ok"] and result.parity_after["ok"]
    assert result.best_epoch > 0
    first, best = result.history[0]["held_out_loss"], min(h["held_out_loss"] for h in result.history)
    assert best < 0.8 * first
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [i.name for i in out.graph.input] == [i.name for i in onnx.load(str(pruned)).graph.input]
    assert {n.op_type for n in out.graph.node} == {n.op_type for n in onnx.load(str(pruned)).graph.node}


def test_the_loss_reads_real_tokens_only():
    rng = np.random.default_rng(1)
    s, t = (torch.from_numpy(rng.standard_normal((3, 5, 8)).astype(np.float32)) for _ in range(2))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    noisy = s.clone()
    noisy[~mask] = 100.0
    for kind in (DistillLoss.COSINE, DistillLoss.MSE):
        clean = _output_loss(kind, s, t, 1.0, mask)
        assert float(_output_loss(kind, noisy, t, 1.0, mask)) == pytest.approx(float(clean))
        assert float(_output_loss(kind, noisy, t, 1.0)) != pytest.approx(float(clean))
