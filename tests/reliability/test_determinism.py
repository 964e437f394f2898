"""Determinism: the same recipe on the same machine yields byte-identical .onnx files.

Covered: simplify (three simplifiers, the smallest with parity kept), magnitude pruning (ranking
ties), quantize's calibration and quantization given the scheme, every candidate's score, and which
scheme quantize keeps among several. That choice follows measured latency, which moves with the
machine's load: a tie band broken by the target's order (quantize.select._fastest) keeps it still
when candidates are close, and the timings are recorded in the stage cache (quantize.timing_record),
so a re-run of the same candidates makes the same choice even when its own timings would say
otherwise (issue 17: 1 run in 8 under load wrote another scheme).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path

import pytest

from onnxforge.targets.latency import LatencyStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_classifier, random_images, save, write_npz

RECIPE = """\
model: classifier.onnx
calibration: calib.npz
stages:
  - simplify
  - prune: {sparsity: 0.3}
  - quantize: {name: one_scheme, schemes: [qdq-u8s8-per-channel]}
  - quantize: {name: choice, inputs: [prune]}
"""


def _digests(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.glob("*.onnx"))}


def test_same_recipe_twice_gives_identical_models(cli, tmp_path, int8_faster):
    # int8 timed faster than fp32: on the tiny classifier it is slower, and quantize would keep the input
    save(make_classifier(), tmp_path / "classifier.onnx")
    write_npz(tmp_path / "calib.npz", x=random_images(64, seed=1))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)

    runs = []
    for name in ("first", "second"):
        code, _, err = cli("run", recipe, "-o", tmp_path / name, "--force")
        assert code == 0, err
        runs.append(tmp_path / name)

    first, second = (_digests(r) for r in runs)
    assert list(first) == ["01_simplify.onnx", "02_prune.onnx", "03_one_scheme.onnx", "04_choice.onnx"]
    assert first == second, "different model bytes"
    scores = [
        {c["scheme"]: c["score"] for c in next(
            s["result"]["candidates"] for s in json.loads((r / "manifest.json").read_text())["stages"]
            if s["name"] == "choice")}
        for r in runs
    ]
    assert scores[0] == scores[1] and len(scores[0]) >= 2


# ----------------------------------------------------------------------------------------------
# The scheme quantize keeps, under timings that change from run to run


def _stats(p50_ms: float) -> LatencyStats:
    return LatencyStats(p50_ms=p50_ms, p90_ms=p50_ms, p99_ms=p50_ms, mean_ms=p50_ms, std_ms=0.0, runs=5, batch=1,
                        samples_ms=(p50_ms,) * 5)


def test_a_latency_tie_goes_to_the_earlier_scheme():
    from onnxforge.pipeline.quantize.config import CandidateResult
    from onnxforge.pipeline.quantize.select import _LATENCY_TIE_FRACTION, _fastest

    first, second = CandidateResult("first", latency=_stats(1.0)), CandidateResult("second", latency=_stats(1.0))
    for faster in (0.999, 0.98, 1.0 / (1.0 + _LATENCY_TIE_FRACTION) + 1e-6):
        second.latency = _stats(faster)
        assert _fastest([first, second]) is first, faster  # within the band: the target's order decides
    second.latency = _stats(0.9)
    assert _fastest([first, second]) is second  # clearly faster wins


@pytest.fixture
def flipping_timings(monkeypatch):
    """compare_latency as a loaded machine might answer: each call, another candidate is 30% faster."""
    from onnxforge.pipeline import reference

    calls = itertools.count()

    def flipping(sessions, feeds, rounds=20, **_):
        labels = [label for label in sessions if label != "fp32"]
        fast = labels[next(calls) % len(labels)]
        return {label: _stats(1.0 if label == fast else 1.3) for label in sessions}

    monkeypatch.setattr(reference, "compare_latency", flipping)  # every timing goes through Reference


def test_a_rerun_keeps_the_scheme_its_recorded_timings_chose(cli, tmp_path, flipping_timings):
    save(make_classifier(), tmp_path / "classifier.onnx")
    write_npz(tmp_path / "calib.npz", x=random_images(64, seed=1))

    def quantize(name: str, *extra) -> tuple[str, dict]:
        output = tmp_path / f"{name}.onnx"
        code, out, err = cli(
            "quantize",
            tmp_path / "classifier.onnx",
            "-o",
            output,
            "--calibration",
            tmp_path / "calib.npz",
            "--scheme",
            "qdq-u8s8-per-tensor",
            "--scheme",
            "qdq-u8s8-per-channel",
            "--tolerance",
            "100",
            "--no-mixed-precision",
            "--json",
            "-",
            *extra,
        )
        assert code == 0, err
        return hashlib.sha256(output.read_bytes()).hexdigest(), json.loads(out)

    first, first_json = quantize("first")
    # --force: the stage itself is recomputed (a plain repeat is answered from the stage cache), and its own
    # timing would pick the other scheme; the record holds
    second, second_json = quantize("second", "--force")
    assert second == first and second_json["chosen"] == first_json["chosen"]
    assert any("recorded by an earlier run" in note for note in second_json["notes"])
    assert second_json["candidates"] == first_json["candidates"]  # timings included: the same JSON

    third, third_json = quantize("third", "--no-cache")  # timed afresh: the flipped timing decides
    assert third_json["chosen"] != first_json["chosen"] and third != first
