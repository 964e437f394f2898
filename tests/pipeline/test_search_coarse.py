"""Coarse-then-fine: every trial is scored on the first eval samples, front candidates again on all of
them; the input model still runs once on the eval data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import make_classifier, random_images, run_model, save, write_npz

from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.search import Objective, OptimizeConfig, Strategy, optimize


def test_trials_are_scored_on_a_subset_and_the_front_on_everything(tmp_path, monkeypatch):
    from onnxforge.pipeline import reference

    model = make_classifier(0, channels=32, dead_channels=16)
    save(model, tmp_path / "model.onnx")
    write_npz(tmp_path / "calib.npz", x=random_images(32, seed=1))
    images = random_images(96, seed=2)
    write_npz(tmp_path / "eval.npz", x=images, label=run_model(model, {"x": images})[0].argmax(1).astype(np.int64))
    runs: list[tuple[str, int]] = []
    original = reference.run_outputs

    def counting(session, samples, batch_size):
        runs.append((str(Path(getattr(session, "_model_path", "") or "bytes").resolve()), len(samples)))
        return original(session, samples, batch_size)

    monkeypatch.setattr(reference, "run_outputs", counting)
    config = OptimizeConfig(calibration=DataSpec(path=tmp_path / "calib.npz"),
                            eval_data=DataSpec(path=tmp_path / "eval.npz"), metric=Metric.ACCURACY, tolerance=0.0,
                            objective=Objective.SIZE, strategy=Strategy.GRID, passes=("prune_channels",),
                            space={"prune_channels.ratio": (0.5, 0.75), "prune_channels.importance": ("l2",)},
                            trials=3, latency_rounds=3, coarse_samples=32)
    result = optimize(tmp_path / "model.onnx", tmp_path / "run", config)
    ok = [r for r in result.trials if r["status"] == "ok"]
    assert len(ok) == 3
    front = {r["number"] for r in result.front}
    for r in ok:  # scored on 32 samples; front candidates again on all 96, their coarse score kept beside
        assert r["eval_samples"] == 32 or (r["eval_samples"] == 96 and r["coarse_quality"] is not None)
        assert r["number"] not in front or r["eval_samples"] == 96
    assert result.best["eval_samples"] == 96
    assert [n for path, n in runs if path == str((tmp_path / "model.onnx").resolve())] == [96]  # once, on all
