"""``optimize`` reads what ``quantize`` reads: a folder of sentence batches whose lengths differ (a ragged
set, through the one data path ``open_data``), for calibration and for evaluation alike."""

from __future__ import annotations

from conftest import save, write_npz
from transformer_graphs import encoder_feeds, make_encoder

from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.search import OptimizeConfig, Strategy, optimize

VOCAB = 50


def test_a_folder_of_sentences_of_different_lengths_is_searched(tmp_path):
    save(make_encoder(vocab=VOCAB), tmp_path / "encoder.onnx")
    sentences = tmp_path / "sentences"
    sentences.mkdir()
    for i, tokens in enumerate((5, 8, 11)):  # three lengths: the files cannot be stacked
        write_npz(sentences / f"{i}.npz", **encoder_feeds(batch=4, tokens=tokens, seed=i, vocab=VOCAB))
    data = DataSpec(path=sentences)
    config = OptimizeConfig(calibration=data, eval_data=data, metric=Metric.COSINE, tolerance=0.05,
                            strategy=Strategy.GRID, passes=("quantize",), trials=2, latency_rounds=3,
                            space={"quantize.schemes": (["dynamic-s8-per-channel"],)})
    result = optimize(tmp_path / "encoder.onnx", tmp_path / "run", config)
    quantized = [r for r in result.trials if r["plan"].get("precision") == "quantize"]
    assert quantized and all(r["status"] == "ok" for r in result.trials), [r.get("error") for r in result.trials]
    assert 0.9 < quantized[0]["quality"] < 1.0  # scored on every sentence: close to the input, not equal
