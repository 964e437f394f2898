"""Latency statistics: structure and ordering only; absolute times are never asserted."""

from __future__ import annotations

import time

import onnxruntime as ort
import pytest
from conftest import make_classifier, random_images

from onnxforge.targets.latency import LatencyStats, compare_latency, measure_latency


@pytest.fixture
def session(classifier):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(classifier.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _check(stats: LatencyStats, batch: int) -> None:
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0
    assert stats.batch == batch
    assert stats.throughput == pytest.approx(1000.0 * batch / stats.p50_ms)


def test_from_times_percentiles():
    stats = LatencyStats.from_times([0.001 * i for i in range(1, 101)], batch=4)
    assert stats.runs == 100
    assert stats.p50_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.throughput == pytest.approx(4000 / 50.5)
    data = stats.to_json()
    assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "runs", "batch", "throughput_per_s"} <= set(data)


def test_measure_latency_runs_at_least_min_runs(session):
    stats = measure_latency(session, {"x": random_images(3)}, warmup=1, min_runs=25, min_seconds=0.0)
    assert stats.runs >= 25
    _check(stats, batch=3)


def test_measure_latency_respects_max_runs(session):
    stats = measure_latency(session, {"x": random_images(1)}, warmup=0, min_runs=1, min_seconds=60.0, max_runs=40)
    assert stats.runs == 40


def test_compare_latency_interleaves_every_session(session, classifier):
    other = ort.InferenceSession(make_classifier(seed=1).SerializeToString(), providers=["CPUExecutionProvider"])
    timings = compare_latency({"a": session, "b": other}, {"x": random_images(2)}, warmup=1, rounds=7, runs_per_round=2)
    assert set(timings) == {"a", "b"}
    for stats in timings.values():
        assert stats.runs == 14
        _check(stats, batch=2)


def test_compare_latency_accepts_feeds_per_session(session):
    per_session = {"one": {"x": random_images(1)}, "four": {"x": random_images(4)}}
    timings = compare_latency({"one": session, "four": session}, per_session, warmup=0, rounds=3)
    assert timings["one"].batch == 1 and timings["four"].batch == 4


@pytest.mark.parametrize("target_name", ["cpu", "mobile"])
def test_sessions_timed_in_turn_do_not_spin(target_name):
    # an idle session's spinning pool took the cores of the one being timed: ratios flipped with the order
    from onnxforge.targets import get_target

    target = get_target(target_name)
    interleaved = target.session_options(2, interleaved=True)
    assert interleaved.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    plain = target.session_options(2)
    if target_name == "cpu":  # a deployed CPU model keeps onnxruntime's default (spinning on)
        with pytest.raises(RuntimeError, match="does not have configuration"):
            plain.get_session_config_entry("session.intra_op.allow_spinning")


def test_a_long_tail_is_called_noisy_and_a_tight_timing_is_not():
    quiet = LatencyStats.from_times([0.010 + 0.0001 * (i % 5) for i in range(100)], batch=1)
    assert quiet.noise_warning() is None
    assert quiet.to_json()["p90_over_p50"] == pytest.approx(quiet.p90_ms / quiet.p50_ms)
    hiccups = LatencyStats.from_times([0.010] * 97 + [2.0] * 3, batch=1)  # p90 tight, p99 200x p50
    assert hiccups.p90_over_p50 == pytest.approx(1.0)
    warning = hiccups.noise_warning()
    assert warning is not None and "p99" in warning and "noisy" in warning
    spread = LatencyStats.from_times([0.010] * 60 + [0.020] * 40, batch=1)  # p90 2x p50
    assert spread.noise_warning() is not None


class _Sleeper:
    """A stand-in session whose run takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, _outputs, _feeds):
        time.sleep(self.seconds)


def test_compare_latency_stops_timing_a_clearly_slower_session_but_never_a_rival():
    sessions = {"reference": _Sleeper(0.002), "slow": _Sleeper(0.02), "close": _Sleeper(0.002)}
    stats = compare_latency(sessions, {}, warmup=0, rounds=12, drop_slower_than=1.3, rivals=["reference"],
                            min_rounds=4)
    assert stats["reference"].runs == 36 and stats["close"].runs == 36  # a rival, and one as fast: timed all along
    assert stats["slow"].runs == 12  # 4 rounds of 3 runs, then dropped
    assert stats["slow"].p50_ms > 1.3 * stats["reference"].p50_ms
    kept = compare_latency(sessions, {}, warmup=0, rounds=6, min_rounds=4)
    assert kept["slow"].runs == 18  # without drop_slower_than every session runs every round
