"""Keras MobileNetV2 (keras.applications, random weights, KERAS_BACKEND=torch) exported through
onnxforge: depthwise chains, Conv -> BatchNorm folded, a classifier head. Channel pruning at ratio 0.1
wrote a Conv weight [22, 0, 3, 3] and exited 0; it must never write a layer without channels, and must
either keep the answers or exit 4 with the numbers."""

from __future__ import annotations

import importlib.util
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_runs import folder, outcome, run_cli  # noqa: F401 (folder: a fixture)

pytestmark = pytest.mark.slow  # minutes: real models

if importlib.util.find_spec("keras") is None:  # not imported here: the export runs it in a child process
    pytest.skip("keras is not installed (pip install 'onnxforge[keras]')", allow_module_level=True)


@pytest.fixture(scope="module")
def mobilenet(folder):
    source = folder / "mobilenet.py"
    source.write_text(textwrap.dedent("""
        import os
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras

        def build():
            keras.utils.set_random_seed(0)
            return keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35, classes=100)
    """))
    exported, simplified = folder / "mobilenet.onnx", folder / "mobilenet_s.onnx"
    code, _, err, _ = run_cli("export", f"{source}:build", "-o", exported)
    assert code == 0, err
    code, _, err, _ = run_cli("simplify", exported, "-o", simplified)
    assert code == 0, err
    rng = np.random.default_rng(0)
    name = onnx.load(str(simplified)).graph.input[0].name
    np.savez(folder / "mnv2_calib.npz", **{name: rng.uniform(-1, 1, (40, 96, 96, 3)).astype(np.float32)})
    return simplified


def test_channel_pruning_never_writes_a_layer_without_channels(folder, mobilenet):
    out, report = folder / "mnv2_p.onnx", folder / "mnv2_p.json"
    code, _, err, _ = run_cli("prune", mobilenet, "-o", out, "--method", "channels", "--ratio", "0.1",
                              "--calibration", folder / "mnv2_calib.npz", "--json", report)
    data = outcome(code, report, err)
    model = onnx.load(str(out))
    assert not [(w.name, list(w.dims)) for w in model.graph.initializer if 0 in w.dims]
    x = np.random.default_rng(1).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 100)
    if code == 0:
        assert data["pruned_layers"] and data["quality_measured"] and data["speed"] is not None
