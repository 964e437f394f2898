"""Keras 3 (torch backend) -> ONNX: a CNN from file.py:callable and from a .keras file, a model with
dict inputs and two outputs, and the TensorFlow backend without the 'tf' extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import onnxruntime as ort
import pytest

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="needs KERAS_BACKEND=torch")

from onnxforge.cli import main  # noqa: E402

CNN_SOURCE = textwrap.dedent(
    """
    import keras

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16, 16, 3), name="image")
        x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        y = keras.layers.Conv2D(8, 3, padding="same")(x)
        x = keras.layers.Add()([x, y])
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(5, name="logits")(x)
        return keras.Model(inputs, outputs)
    """
)


def _load_cnn(path):
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["build"]()


def _independent_check(model, onnx_path, feeds_by_name, keras_inputs):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds_by_name)
    expected = keras.tree.flatten(model(keras_inputs, training=False))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, keras.ops.convert_to_numpy(e), atol=1e-4, rtol=1e-3)


def test_keras_cnn_from_callable(tmp_path):
    source = tmp_path / "cnn.py"
    source.write_text(CNN_SOURCE)
    out = tmp_path / "cnn.onnx"
    report = tmp_path / "r.json"
    assert main(["export", f"{source}:build", "-o", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["exporter"] == "keras" and result["verified"] is True
    assert result["parity"]["batch_sizes"] == [1, 3]  # Keras leaves the batch dynamic
    assert result["inputs"] == [{"name": "image", "shape": ["batch", 16, 16, 3], "dtype": "float32"}]
    # the output's batch is the input's 'batch', not the dim the exporter named after an op (Add485_dim_0)
    assert result["outputs"] == [{"name": "logits", "shape": ["batch", 5], "dtype": "float32"}]

    model = _load_cnn(source)  # same seed, same weights
    images = np.random.default_rng(5).standard_normal((2, 16, 16, 3)).astype(np.float32)
    _independent_check(model, out, {"image": images}, images)


def test_keras_file(tmp_path):
    source = tmp_path / "cnn.py"
    source.write_text(CNN_SOURCE)
    model = _load_cnn(source)
    saved = tmp_path / "cnn.keras"
    model.save(str(saved))
    out = tmp_path / "from_file.onnx"
    assert main(["export", str(saved), "-o", str(out)]) == 0
    images = np.random.default_rng(6).standard_normal((4, 16, 16, 3)).astype(np.float32)
    _independent_check(model, out, {"image": images}, images)


SEQUENTIAL_SOURCE = textwrap.dedent(
    """
    import keras

    def with_input():
        # built from keras.Input but never called: Keras's exporter refused it ("has never called")
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])

    def without_input():
        return keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)])
    """
)


def test_sequential_built_from_keras_input_but_never_called(tmp_path, capsys):
    source = tmp_path / "seq.py"
    source.write_text(SEQUENTIAL_SOURCE)
    out = tmp_path / "seq.onnx"
    report = tmp_path / "r.json"
    assert main(["export", f"{source}:with_input", "-o", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["verified"] is True
    assert [o["name"] for o in result["outputs"]] == ["output"]  # not the exporter's node number
    namespace: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    features = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    _independent_check(namespace["with_input"](), out, {result["inputs"][0]["name"]: features}, features)

    capsys.readouterr()
    assert main(["export", f"{source}:without_input", "-o", str(tmp_path / "no.onnx")]) == 2
    err = capsys.readouterr().err
    assert "no input shape" in err and "keras.Input" in err and "Traceback" not in err
    assert not (tmp_path / "no.onnx").exists()


def test_dict_inputs_are_fed_by_name_not_dict_order(tmp_path):
    """Keras flattens a dict of inputs sorted by key ('left', 'right'), not in the dict's order."""
    keras.utils.set_random_seed(1)
    left = keras.Input((8,), name="left")
    right = keras.Input((4,), name="right")
    hidden = keras.layers.Concatenate()([keras.layers.Dense(3)(left), right])
    model = keras.Model(
        {"right": right, "left": left},
        [keras.layers.Dense(2, name="scores")(hidden), keras.layers.Dense(1, name="gate")(hidden)],
    )
    saved = tmp_path / "two.keras"
    model.save(str(saved))
    out = tmp_path / "two.onnx"
    report = tmp_path / "r.json"
    assert main(["export", str(saved), "-o", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["verified"] is True
    assert {i["name"]: i["shape"] for i in result["inputs"]} == {"left": ["batch", 8], "right": ["batch", 4]}
    assert [o["name"] for o in result["outputs"]] == ["scores", "gate"]
    rng = np.random.default_rng(2)
    feeds = {
        "left": rng.standard_normal((3, 8)).astype(np.float32),
        "right": rng.standard_normal((3, 4)).astype(np.float32),
    }
    _independent_check(model, out, feeds, feeds)


def test_tensorflow_backend_without_the_tf_extra(tmp_path):
    try:
        import tensorflow  # noqa: F401

        pytest.skip("TensorFlow is installed here")
    except ImportError:
        pass
    source = tmp_path / "cnn.py"
    source.write_text(CNN_SOURCE)
    out = tmp_path / "tf.onnx"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    code = "import sys; from onnxforge.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "export", f"{source}:build", "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'tf' extra" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
