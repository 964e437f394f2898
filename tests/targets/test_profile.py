"""profile(): a row per (threads, batch), with the feeds the user asked for."""

from __future__ import annotations

import pytest
from conftest import random_images, write_npz

from onnxforge.errors import UsageError
from onnxforge.targets.profile import ProfileConfig, profile


def _fast(**kwargs) -> ProfileConfig:
    return ProfileConfig(min_seconds=0.0, min_runs=5, warmup=1, **kwargs)


def test_rows_cover_the_sweep(classifier_path):
    result = profile(classifier_path, _fast(batch_sizes=(1, 2, 8), threads=(1, 2)))
    assert [(r.threads, r.batch) for r in result.rows] == [(1, 1), (1, 2), (1, 8), (2, 1), (2, 2), (2, 8)]
    for row in result.rows:
        assert row.latency.batch == row.batch  # the model really ran at that batch
        assert row.latency.runs >= 5
        assert 0 < row.latency.p50_ms <= row.latency.p90_ms <= row.latency.p99_ms
    assert result.target == "cpu"


def test_sample_data_sets_the_inputs(classifier_path, tmp_path):
    data = write_npz(tmp_path / "d.npz", x=random_images(3))
    result = profile(classifier_path, _fast(batch_sizes=(5,), sample_data=data))
    assert result.rows[0].latency.batch == 5


def test_fixed_batch_model_keeps_its_batch(tmp_path):
    from conftest import make_classifier, save

    path = save(make_classifier(batch=2), tmp_path / "fixed.onnx")
    result = profile(path, _fast())
    assert result.rows[0].latency.batch == 2


def test_unknown_target(classifier_path):
    with pytest.raises(UsageError, match="tpu"):
        profile(classifier_path, _fast(target="tpu"))


def test_the_table_shows_the_spread_and_warns_when_the_timing_is_noisy(capsys):
    """Issue 25: a p99 200x the p50 was printed without a word."""
    from pathlib import Path

    from onnxforge.cli.profile import _render_profile
    from onnxforge.targets.latency import LatencyStats
    from onnxforge.targets.profile import ProfileResult, ProfileRow

    quiet = LatencyStats.from_times([0.001] * 100, batch=1)
    noisy = LatencyStats.from_times([0.001] * 97 + [0.2] * 3, batch=4)
    _render_profile(ProfileResult(Path("m.onnx"), "cpu", [ProfileRow(1, 1, quiet)]), top=5)
    printed = capsys.readouterr().out
    assert "p90/p50" in printed and "p99/p50" in printed and "noisy" not in printed
    _render_profile(ProfileResult(Path("m.onnx"), "cpu", [ProfileRow(1, 1, quiet), ProfileRow(4, 1, noisy)]), top=5)
    printed = capsys.readouterr().out
    assert "warning: batch 4, threads 1: noisy timing" in " ".join(printed.split())
