"""silero-vad (real weights, from the ``silero-vad`` wheel): a scalar int64 ``sr`` that picks an If
branch, a state ``[2, batch, 128]`` with its batch on axis 1. The data says so (``sr@const``, ``state``
batched on axis 1 by itself), and every command honours it; the check is the speech probability."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from cli_runs import folder, outcome, run_cli  # noqa: F401 (folder: a fixture)
from realworld_models import require

pytestmark = pytest.mark.slow  # minutes: real models

CHUNK = 576  # 512 new samples at 16 kHz and the 64 before them, as silero's own wrapper feeds the model


def _stream(seconds: float, seed: int) -> np.ndarray:
    """Speech-like audio: harmonics of a drifting pitch under a syllable-rate envelope, pauses, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / 16000
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) * (np.sin(2 * np.pi * 0.3 * t) > -0.3)
    return (0.3 * voice * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def stream_samples(path) -> tuple[np.ndarray, np.ndarray]:
    """(chunks, states) of three 2-second streams as silero's own wrapper feeds them: each chunk with
    the state the model itself carried to it (realistic state values). Also used by benchmarks/realworld.py."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chunks, states = [], []
    for seed in range(3):
        audio, state, context = _stream(2.0, seed), np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32)
        for start in range(0, len(audio) - 512, 512):
            chunk = np.concatenate([context, audio[start : start + 512]])
            chunks.append(chunk)
            states.append(state[:, 0])
            _, state = session.run(None, {"input": chunk[None], "state": state, "sr": np.array(16000)})
            context = chunk[-64:]
    return np.stack(chunks), np.stack(states)


@pytest.fixture(scope="module")
def vad(folder):
    path = require("silero_vad")
    chunks, states = stream_samples(path)
    data = folder / "vad.npz"
    np.savez(data, input=chunks, state=states, **{"sr@const": np.array(16000)})
    return path, data, chunks, states


def _speech(path, chunks, states) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": chunks, "state": np.ascontiguousarray(states.transpose(1, 0, 2)),
                              "sr": np.array(16000)})[0].ravel()


def test_simplify_and_profile_run_on_the_data_as_declared(folder, vad):
    path, data, _, _ = vad
    code, _, err, _ = run_cli("simplify", path, "-o", folder / "vad_s.onnx", "--data", data)
    assert code == 0, err
    code, out, err, _ = run_cli("profile", path, "--data", data, "--min-seconds", "0.2")
    assert code == 0, err
    assert "samples of" in out


def test_quantize_keeps_the_speech_probabilities(folder, vad):
    path, data, chunks, states = vad
    reference = _speech(path, chunks, states)
    assert reference.max() > 0.5 > reference.min()  # the stream has speech and silence
    out, report = folder / "vad_q.onnx", folder / "vad_q.json"
    code, _, err, _ = run_cli("quantize", path, "-o", out, "--calibration", data, "--json", report)
    data_json = outcome(code, report, err)
    assert any("sr = constant 16000" in n for n in data_json["notes"])
    if code == 0:
        got = _speech(out, chunks, states)
        assert np.mean(np.abs(got - reference)) < 0.05
        assert np.mean((got > 0.5) == (reference > 0.5)) > 0.95


def test_quantize_says_when_nothing_was_quantized(folder, vad):
    # silero-vad's Convs and LSTMs live in If bodies: the "quantized" model was the float one, said nowhere
    path, data, _, _ = vad
    code, _, err, _ = run_cli("quantize", path, "-o", folder / "vad_q2.onnx", "--calibration", data,
                              "--scheme", "qdq-u8s8-per-tensor", "--json", folder / "vad_q2.json")
    notes = outcome(code, folder / "vad_q2.json", err)["notes"]
    assert any(n.startswith("nothing was quantized") and "If/Loop/Scan bodies" in n for n in notes), notes
