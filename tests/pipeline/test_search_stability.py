"""A stable search: timing noise does not steer it. Trial plans follow from the seed, the quality and the
timings at the sampler's resolution; the final choice is re-timed until it separates, or says it did not."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_classifier, random_images, run_model, save, write_npz

from onnxforge.pipeline.data_spec import DataSpec
from onnxforge.pipeline.evaluate import Metric
from onnxforge.pipeline.search import Objective, OptimizeConfig, Strategy, optimize
from onnxforge.pipeline.search import trial as trial_module
from onnxforge.pipeline.search.timing import median_timing, separate, steer_ratio


@pytest.fixture
def project(tmp_path):
    model = make_classifier(0, channels=32, dead_channels=16)
    save(model, tmp_path / "model.onnx")
    write_npz(tmp_path / "calib.npz", x=random_images(32, seed=1))
    images = random_images(64, seed=2)
    write_npz(tmp_path / "eval.npz", x=images, label=run_model(model, {"x": images})[0].argmax(1).astype(np.int64))
    return tmp_path


def _noisy_timer(monkeypatch, seed: int, noise: float) -> None:
    """Timings whose truth is a function of the model (its file size, relative to the input's) and whose
    every call is off by up to ``noise`` either way, as on a CPU."""
    rng = np.random.default_rng(seed)

    def size(model) -> int:
        return len(model) if isinstance(model, bytes) else os.path.getsize(model)

    def fake(models, reference, ctx, feeds, rounds=None):
        out = {}
        for name, model in models.items():
            truth = (size(model) / size(reference)) ** 0.5
            reference_ms = 10.0 * (1 + rng.uniform(-noise, noise))
            model_ms = 10.0 * truth * (1 + rng.uniform(-noise, noise))
            out[name] = {"reference_ms": reference_ms, "model_ms": model_ms, "ratio": model_ms / reference_ms}
        return out

    monkeypatch.setattr(trial_module, "time_against_reference", fake)


def _config(project, **overrides) -> OptimizeConfig:
    values = dict(calibration=DataSpec(path=project / "calib.npz"), eval_data=DataSpec(path=project / "eval.npz"),
                  metric=Metric.ACCURACY, tolerance=10.0, objective=Objective.LATENCY, strategy=Strategy.TPE,
                  passes=("prune_channels",), trials=8, seed=3, latency_rounds=3,
                  space={"prune_channels.importance": ("l2",), "prune_channels.ratio": (0.25, 0.4, 0.5, 0.6, 0.75)})
    return OptimizeConfig(**{**values, **overrides})


def test_the_plan_sequence_and_the_best_are_a_function_of_the_seed(project, monkeypatch):
    """With the sampler told these noisy ratios (``timing_resolution=0.1``) the sequences part at trial 4."""
    runs = []
    for noise_seed in (0, 1):
        _noisy_timer(monkeypatch, noise_seed, noise=0.03)
        result = optimize(project / "model.onnx", project / f"run{noise_seed}", _config(project))
        runs.append(result)
    plans = [[r["plan"] for r in result.trials] for result in runs]
    assert plans[0] == plans[1]
    assert len({str(p) for p in plans[0]}) > 3  # the sampler did explore
    assert runs[0].best["number"] == runs[1].best["number"]
    assert runs[0].trials[1]["ratio"] != runs[1].trials[1]["ratio"]  # the timings did differ


def test_the_sampler_sees_ratios_on_a_ladder():
    assert steer_ratio(0.50, 0.1) == steer_ratio(0.51, 0.1) == steer_ratio(0.49, 0.1)
    assert steer_ratio(0.50, 0.1) != steer_ratio(0.60, 0.1)
    assert steer_ratio(0.5123, 0.0) == 0.5123


def _timer(truths: dict[str, float], noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    calls = []

    def timer(models, rounds):
        calls.append(rounds)
        # the noise of a call shrinks with its rounds, as a p50 over more runs does
        scale = noise / np.sqrt(rounds / 10)
        return {name: {"reference_ms": 10.0, "model_ms": 10.0 * truths[name] * (1 + rng.uniform(-scale, scale)),
                       "ratio": truths[name] * (1 + rng.uniform(-scale, scale))} for name in models}

    return timer, calls


def test_a_trial_ratio_is_the_median_of_its_calls():
    timer, calls = _timer({"a": 0.5}, noise=0.0)
    timed = median_timing({"a": "a.onnx"}, timer, rounds=10, repeats=3)
    assert len(calls) == 3 and timed["a"]["ratio"] == pytest.approx(0.5) and timed["a"]["ratio_spread"] == 0


def test_the_final_choice_is_retimed_until_it_separates():
    records = [{"number": n, "model": str(n), "within_budget": True, "ratio": 0.0} for n in (1, 2, 3)]
    timer, calls = _timer({"1": 0.50, "2": 0.53, "3": 0.9}, noise=0.08)
    settled = separate(records, timer, rounds=10, repeats=3)
    assert settled["separated"] and settled["contenders"] == [1, 2]
    assert settled["rounds"] > 10 and max(calls) == settled["rounds"]  # more rounds than the first pass


def test_a_choice_within_noise_is_reported_as_such():
    records = [{"number": n, "model": str(n), "within_budget": True, "ratio": 0.0} for n in (1, 2)]
    timer, _ = _timer({"1": 0.50, "2": 0.50}, noise=0.05)
    settled = separate(records, timer, rounds=10, repeats=3, max_doublings=2)
    assert not settled["separated"] and settled["rounds"] == 40


def test_two_equal_slow_models_stop_at_the_time_budget_not_after_every_doubling():
    records = [{"number": n, "model": str(n), "within_budget": True, "ratio": 0.0} for n in (1, 2)]
    timer, calls = _timer({"1": 0.50, "2": 0.50}, noise=0.05)
    now = [0.0]

    def slow_timer(models, rounds):  # each model's round "takes" 50 ms on a fake clock
        now[0] += 0.05 * rounds * len(models) * 1.0
        return timer(models, rounds)

    settled = separate(records, slow_timer, rounds=30, repeats=5, budget_s=120.0, clock=lambda: now[0])
    # 30 rounds x 2 models x 5 calls = 15 s; the next doubling (60 rounds) adds 30 s, then 60 s: the one after
    # (240 rounds, 120 s) would pass 120 s and is not started
    assert not settled["separated"] and settled["stopped"] == "time budget" and settled["rounds"] == 120
    assert now[0] <= 120.0 and max(calls) == 120


def test_the_cost_estimate_charges_launches_and_int8_by_its_macs():
    """The sampler's latency stand-in: an int8 copy of a model (4x smaller file, same MACs) is estimated at
    most ``int8_speedup`` faster, and a model pruned to few MACs is bounded by its kernel launches."""
    from onnxforge.model_cost import ComputeCost
    from onnxforge.pipeline.search.timing import cost_estimate

    reference = ComputeCost(float_macs=66_000_000, integer_macs=0, kernels=15)
    weights = {"kernel_macs": 180_000, "int8_speedup": 3.0}
    int8 = cost_estimate(500, ComputeCost(0, 66_000_000, 19), 2000, reference, **weights)
    assert 1 / 3.0 < int8 < 0.5
    pruned = cost_estimate(100, ComputeCost(4_000_000, 0, 15), 2000, reference, **weights)
    assert pruned < int8
    tiny = cost_estimate(1, ComputeCost(1, 0, 15), 2000, reference, **weights)
    assert tiny == pytest.approx(15 * 180_000 / (66_000_000 + 15 * 180_000), rel=1e-3)
    assert cost_estimate(500, None, 2000, reference, **weights) == 0.25  # uncounted: the size ratio
