"""The measurement service: one reference, scored once per process, every candidate timed against
the reference's own timing in the same interleaved call; and every caller goes through it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_classifier, random_images, save

from onnxforge.pipeline import reference as reference_module
from onnxforge.pipeline.evaluate import Metric, QualityGate
from onnxforge.pipeline.reference import Reference, Timing
from onnxforge.targets.latency import LatencyStats


@pytest.fixture
def runs(monkeypatch) -> list[int]:
    """The number of samples of every model run on evaluation data."""
    sizes: list[int] = []
    original = reference_module.run_outputs

    def counting(session, samples, batch_size):
        sizes.append(len(samples))
        return original(session, samples, batch_size)

    monkeypatch.setattr(reference_module, "run_outputs", counting)
    return sizes


def _stats(p50: float) -> LatencyStats:
    return LatencyStats(p50, p50, p50, p50, 0.0, 9, 1)


def test_the_reference_scores_itself_and_runs_once_per_model_and_data(tmp_path, classifier_path, eval_npz, runs):
    first = Reference(classifier_path, eval_npz, "cpu")
    assert first.gate.metric is Metric.ACCURACY and first.value == 1.0  # labels are its own top-1
    assert first.score(classifier_path) == 1.0
    other = save(make_classifier(seed=5), tmp_path / "other.onnx")
    value = first.score(other)
    again = Reference(classifier_path, eval_npz, "cpu")  # another object, the same model and data
    assert again.value == 1.0 and again.score(other) == value
    assert runs == [64, 64]  # the reference once, the candidate once: nothing measured twice
    assert first.passes(1.0) and first.passes(value) == (value >= 1.0 - 0.005)


def test_a_changed_data_file_is_measured_again(tmp_path, classifier_path, runs):
    data = tmp_path / "eval.npz"
    np.savez(data, x=random_images(8, seed=1))
    Reference(classifier_path, data, "cpu").outputs  # noqa: B018
    np.savez(data, x=random_images(12, seed=2))
    assert len(Reference(classifier_path, data, "cpu").samples) == 12
    Reference(classifier_path, data, "cpu").outputs  # noqa: B018
    assert runs == [8, 12]


def test_a_data_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """Every stage of every trial keys its cache on its data files' content: hashed once, not per stage."""
    from onnxforge import model_io
    from onnxforge.pipeline import codec
    from onnxforge.pipeline.data_spec import DataSpec

    hashed = []
    original = model_io.content_sha256
    monkeypatch.setattr(model_io, "content_sha256", lambda path: hashed.append(path) or original(path))
    data = tmp_path / "calib.npz"
    np.savez(data, x=random_images(4, seed=1))
    spec = DataSpec(path=data)
    first = codec.fingerprint(spec)
    assert codec.fingerprint(spec) == first and codec.fingerprint({"eval": data}) == {"eval": first["path"]}
    assert len(hashed) == 1
    np.savez(data, x=random_images(5, seed=1))
    assert codec.fingerprint(spec) != first and len(hashed) == 2


def test_candidates_are_timed_in_one_call_against_the_references_own_timing(classifier_path, eval_npz, monkeypatch):
    calls = []
    built = []
    original_session = type(Reference(classifier_path, None).target).session

    def session(self, model, **kwargs):
        built.append(kwargs.get("interleaved"))
        return original_session(self, model, **kwargs)

    def timed(sessions, feeds, **kwargs):
        calls.append((list(sessions), kwargs))
        return {name: _stats(2.0 if i == 0 else 1.0 + i) for i, name in enumerate(sessions)}

    monkeypatch.setattr(type(Reference(classifier_path, None).target), "session", session)
    monkeypatch.setattr(reference_module, "compare_latency", timed)
    reference = Reference(classifier_path, eval_npz, "cpu")
    timings = reference.time_against({"a": classifier_path, "b": classifier_path}, rounds=7, threads=1)
    assert len(calls) == 1 and calls[0][0][1:] == ["a", "b"] and calls[0][1]["rounds"] == 7
    assert built == [True, True, True]  # every timed session without spinning thread pools
    assert timings["a"] == Timing(_stats(2.0), _stats(2.0)) and timings["a"].speedup == 1.0
    assert timings["b"].ratio == 1.5 and timings["b"].reference.p50_ms == 2.0
    both = reference.time_against({"a": classifier_path}, reference_name="input")
    assert both["input"].ratio == 1.0


def test_the_gate_states_its_tolerance_in_its_unit():
    assert "points" in QualityGate(metric=Metric.ACCURACY, tolerance=0.5).describe_tolerance()
    assert "minimum" in QualityGate(metric=Metric.COSINE, tolerance=0.99).unit
    assert "maximum" in QualityGate(metric=Metric.REL_ERROR, tolerance=0.05).unit


# ----------------------------------------------------------------------------------------------
# Every caller goes through it


@pytest.fixture
def spied(monkeypatch) -> dict[str, list]:
    calls: dict[str, list] = {"score": [], "verdict": [], "time_against": []}
    score, verdict, time_against = Reference.score, Reference.verdict, Reference.time_against

    def spy_score(self, candidate):
        calls["score"].append(candidate)
        return score(self, candidate)

    def spy_verdict(self, candidate):  # a score with every rule of the gate judged from the same outputs
        calls["verdict"].append(candidate)
        return verdict(self, candidate)

    def spy_time(self, candidates, **kwargs):
        calls["time_against"].append(sorted(candidates))
        return time_against(self, candidates, **kwargs)

    monkeypatch.setattr(Reference, "score", spy_score)
    monkeypatch.setattr(Reference, "verdict", spy_verdict)
    monkeypatch.setattr(Reference, "time_against", spy_time)
    return calls


def test_prune_checks_score_and_time_through_the_reference(tmp_path, classifier_path, calibration_npz, eval_npz,
                                                           spied):
    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, prune_channels

    result = prune_channels(classifier_path, tmp_path / "p.onnx", ChannelPruneConfig(
        ratio=0.5, calibration_data=calibration_npz, eval_data=eval_npz, tolerance=100))
    assert spied["score"] and spied["time_against"] == [["candidate"]]
    assert result.speed["speedup"] == pytest.approx(result.speed["input_p50_ms"] / result.speed["candidate_p50_ms"])


def test_quantize_scores_and_times_its_candidates_through_the_reference(tmp_path, classifier_path, calibration_npz,
                                                                        spied, int8_faster):
    from onnxforge.pipeline.quantize import QuantizeConfig, quantize
    from onnxforge.targets import ActivationType, QuantFormat, QuantScheme

    scheme = QuantScheme(format=QuantFormat.QDQ, activations=ActivationType.UINT8, per_channel=False)
    result = quantize(classifier_path, tmp_path / "q.onnx", calibration_npz, QuantizeConfig(
        schemes=(scheme,), tolerance=100, latency_rounds=3,
        mixed_precision=False, error_report=False))
    assert len(spied["score"]) == 1 and spied["time_against"] == [[scheme.label]]
    chosen = result.chosen_candidate
    assert chosen.speedup == pytest.approx(result.fp32_latency.p50_ms / chosen.latency.p50_ms)


def test_the_runner_scores_and_times_every_row_through_the_reference(tmp_path, classifier_path, calibration_npz,
                                                                     eval_npz, spied):
    from onnxforge.pipeline.recipe import load_recipe
    from onnxforge.pipeline.runner import run_recipe

    (tmp_path / "recipe.yaml").write_text(
        "name: r\nmodel: classifier.onnx\neval: eval.npz\nstages:\n  - simplify\n  - fp16\n")
    result = run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run")
    assert spied["time_against"] == [["fp16", "simplify"]]  # the input is the reference: one call
    assert len(spied["score"]) + len(spied["verdict"]) == 3  # every row, the input's included
    assert result.manifest.baseline.metrics["speedup_vs_first"] == 1.0
