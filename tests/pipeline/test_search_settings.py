"""``--threads 1,2``: one front and one best model per (batch, threads) setting, since a model that wins at
one thread may lose at two."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import make_classifier, random_images, run_model, save, write_npz

from onnxforge.errors import UsageError
from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.search import Objective, OptimizeConfig, Strategy, optimize
from onnxforge.pipeline.search import trial as trial_module


def test_each_setting_gets_its_own_front_and_best(tmp_path, monkeypatch):
    model = make_classifier(0, channels=32, dead_channels=16)
    save(model, tmp_path / "model.onnx")
    write_npz(tmp_path / "calib.npz", x=random_images(32, seed=1))
    images = random_images(64, seed=2)
    write_npz(tmp_path / "eval.npz", x=images, label=run_model(model, {"x": images})[0].argmax(1).astype(np.int64))

    def size(m) -> int:
        return len(m) if isinstance(m, bytes) else os.path.getsize(m)

    def fake(models, reference, ctx, feeds, rounds=None):
        # at 1 thread the smaller model is faster; at 2 threads the larger (as a pruned layer can be)
        out = {}
        for name, m in models.items():
            relative = (size(m) / size(reference)) ** 0.5
            ratio = relative if ctx.threads == 1 else 1.0 / relative
            out[name] = {"reference_ms": 10.0, "model_ms": 10.0 * ratio, "ratio": ratio}
        return out

    monkeypatch.setattr(trial_module, "time_against_reference", fake)
    config = OptimizeConfig(calibration=DataSpec(path=tmp_path / "calib.npz"),
                            eval_data=DataSpec(path=tmp_path / "eval.npz"), metric=Metric.ACCURACY, tolerance=0.0,
                            objective=Objective.LATENCY, strategy=Strategy.GRID, passes=("prune_channels",),
                            space={"prune_channels.ratio": (0.25, 0.5), "prune_channels.importance": ("l2",)},
                            trials=3, latency_rounds=3, threads=(1, 2))
    result = optimize(tmp_path / "model.onnx", tmp_path / "run", config)
    by_threads = {s["threads"]: s for s in result.settings}
    assert set(by_threads) == {1, 2} and all(s["batch"] == 1 for s in result.settings)
    one, two = by_threads[1], by_threads[2]
    assert one["best"] == result.best["number"]  # the first setting is the search's own
    assert result.best["plan"]["prune_channels.ratio"] == 0.5
    assert two["best"] != one["best"]  # the larger model wins at two threads
    assert all(r["ratio"] > 1 for r in two["front"] if r["number"] != 0)
    for s in result.settings:
        assert (tmp_path / "run" / s["best_path"]).exists()
    pareto = json.loads((tmp_path / "run" / "pareto.json").read_text())
    assert [s["best"] for s in pareto["settings"]] == [one["best"], two["best"]]
    assert "thread(s)</h2>" in (tmp_path / "run" / "report.html").read_text()


def test_settings_must_be_distinct_and_positive(tmp_path):
    data = DataSpec(path=tmp_path / "x.npz")
    with pytest.raises(UsageError, match="distinct"):
        OptimizeConfig(calibration=data, eval_data=data, threads=(1, 1))
    with pytest.raises(UsageError, match="at least 1"):
        OptimizeConfig(calibration=data, eval_data=data, batch=(1, 0))
    assert OptimizeConfig(calibration=data, eval_data=data, batch=(1, 32), threads=2).settings == [(1, 2), (32, 2)]
