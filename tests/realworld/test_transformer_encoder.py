"""A transformers BERT encoder built from a config (random weights, the real architecture: embeddings,
an attention mask, GELU, LayerNorm) exported from ``file.py:callable`` as a user writes it: the
model and an example dict. Every stage must keep what an encoder is used for (mean-pooled sentence
embeddings over the real tokens, and which sentence is nearest to which), with its speed measured,
or exit non-zero with the numbers."""

from __future__ import annotations

import importlib.util
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
from cli_runs import folder, outcome, run_cli  # noqa: F401 (folder: a fixture)

pytestmark = pytest.mark.slow  # minutes: real models

if importlib.util.find_spec("transformers") is None:  # imported in the export's child process only
    pytest.skip("transformers is not installed (pip install 'onnxforge[realworld]')", allow_module_level=True)

VOCAB, SEQ = 2000, 32

SOURCE = textwrap.dedent(f"""
    import torch
    from transformers import BertConfig, BertModel

    def build():
        torch.manual_seed(0)
        config = BertConfig(vocab_size={VOCAB}, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, max_position_embeddings=128)
        model = BertModel(config, add_pooling_layer=False).eval()
        ids = torch.randint(0, {VOCAB}, (2, 16))
        return model, {{"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
""")


def _sentences(count: int, seed: int) -> dict[str, np.ndarray]:
    """Padded batches as a tokenizer writes them: lengths 6..32, zeros after each sentence's end."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (count, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate(rng.integers(6, SEQ + 1, count)):
        ids[row, length:], mask[row, length:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def _pooled(path, feeds) -> np.ndarray:
    """Mean-pooled, normalized sentence embeddings over the real tokens (what sentence encoders return)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hidden = session.run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _keeps_the_embeddings(reference_path, path, feeds, min_cosine: float) -> None:
    """Every sentence's embedding, less the reference's mean embedding, points the same way.

    With random weights all embeddings share one large component (mutual cosine ~0.9), which a
    plain cosine would count as agreement; what tells sentences apart is the rest."""
    expected, got = _pooled(reference_path, feeds), _pooled(path, feeds)
    mean = expected.mean(0)
    expected, got = expected - mean, got - mean
    cosines = (expected * got).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosines.min() >= min_cosine, (cosines.min(), cosines.mean())


@pytest.fixture(scope="module")
def encoder(folder):
    source = folder / "encoder.py"
    source.write_text(SOURCE)
    exported, simplified = folder / "encoder.onnx", folder / "encoder_s.onnx"
    code, _, err, _ = run_cli("export", f"{source}:build", "-o", exported, "--dynamic-batch",
                              "--dynamic", "input_ids=1:sequence", "--dynamic", "attention_mask=1:sequence")
    assert code == 0, err
    np.savez(folder / "enc_calib.npz", **_sentences(48, 0))
    np.savez(folder / "enc_eval.npz", **_sentences(32, 1))
    code, _, err, _ = run_cli("simplify", exported, "-o", simplified, "--data", folder / "enc_eval.npz")
    assert code == 0, err
    return exported, simplified


def test_export_keeps_batch_and_sequence_dynamic(folder, encoder):
    exported, simplified = encoder
    torch = pytest.importorskip("torch")
    namespace: dict = {}
    exec(compile(SOURCE, "encoder.py", "exec"), namespace)
    model, _ = namespace["build"]()
    for count, length in ((1, 7), (3, 40)):  # neither the example's batch nor its length
        feeds = {k: v[:, :length] for k, v in _sentences(count, 5 + count).items()} if length <= SEQ else {
            "input_ids": np.random.default_rng(9).integers(1, VOCAB, (count, length)).astype(np.int64),
            "attention_mask": np.ones((count, length), np.int64)}
        with torch.inference_mode():
            expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        for path in (exported, simplified):
            got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)


def test_quantize_keeps_the_sentence_embeddings_and_is_faster(folder, encoder):
    _, simplified = encoder
    out, report = folder / "enc_q.onnx", folder / "enc_q.json"
    code, _, err, _ = run_cli("quantize", simplified, "-o", out, "--calibration", folder / "enc_calib.npz",
                              "--eval", folder / "enc_eval.npz", "--json", report)
    data = outcome(code, report, err)
    if code == 0:
        chosen = next(c for c in data["candidates"] if c["scheme"] == data["chosen"])
        assert chosen["speedup_vs_fp32"] > 1.0 and out.stat().st_size < simplified.stat().st_size / 2
        _keeps_the_embeddings(simplified, out, _sentences(32, 2), 0.995)


@pytest.mark.parametrize("method", ["channels", "low-rank"])
def test_pruning_keeps_the_embeddings_or_exits_4(folder, encoder, method):
    _, simplified = encoder
    out, report = folder / f"enc_{method}.onnx", folder / f"enc_{method}.json"
    args = ["--ratio", "0.3"] if method == "channels" else []
    code, _, err, _ = run_cli("prune", simplified, "-o", out, "--method", method, *args,
                              "--calibration", folder / "enc_calib.npz", "--eval", folder / "enc_eval.npz",
                              "--json", report)
    data = outcome(code, report, err)
    if code == 0:
        assert data["quality_measured"] and data["speed"] is not None
        assert data["speed"]["batch"] == 1 and data["speed"]["runs"] > 0
        _keeps_the_embeddings(simplified, out, _sentences(32, 2), 0.95)


def test_fp16_checks_parity_on_the_sentences_given(folder, encoder):
    # a dynamic sequence dim once made fp16 exit 2 unless --input-shape was given
    _, simplified = encoder
    out, report = folder / "enc_h.onnx", folder / "enc_h.json"
    code, _, err, _ = run_cli("fp16", simplified, "-o", out, "--data", folder / "enc_eval.npz", "--json", report)
    outcome(code, report, err)
    if code == 0:
        _keeps_the_embeddings(simplified, out, _sentences(8, 3), 0.999)
