"""Keras MobileNetV2 rows: ``keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))``
(random weights: nothing to download; ImageNet's 1000 classes; BatchNorm statistics from one batch of
images, see _SOURCE) exported through onnxforge's own Keras export (``onnxforge export
mobilenet.py:build``, KERAS_BACKEND=torch) and simplified, then quantized and channel-pruned under the
default gates.

Random weights have no task, so quality is the input model's own answers: top-1 agreement with it and
the mean cosine of the class scores, on 50 held-out structured images (shapes and gradients, the
network's [-1, 1] input range), not on noise. 64 other such images calibrate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from benchmarks._stage_outcome import session, speed, stage, time_to_result, verdict

SIZE = 224
# Random weights alone shrink the activations block by block until every image gets the same answer
# (measured: one class, every probability 0.001, for all 20 test images). BatchNorm statistics taken
# from one batch of structured images, as a training step would (momentum 0: the batch's own), keep
# them alive; the weights stay random.
_SOURCE = """
import os
os.environ.setdefault("KERAS_BACKEND", "torch")
import keras
import numpy as np

def build():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=({size}, {size}, 3))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(np.load({images!r}), training=True)
    return model
"""


def structured_images(count: int, seed: int, size: int = SIZE) -> np.ndarray:
    """NHWC images in [-1, 1]: a two-colour gradient with 3-7 filled ellipses, boxes and triangles."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    for i in range(count):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        background = (a + (b - a) * ramp) * np.ones((1, size, 1), np.float32)
        image = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 8)):
            x0, y0 = rng.integers(0, size - 20, 2)
            x1, y1 = x0 + rng.integers(20, size // 2), y0 + rng.integers(20, size // 2)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = rng.integers(3)
            if shape == 0:
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape == 1:
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
        out[i] = np.asarray(image, np.float32) / 127.5 - 1.0
    return out


def _answers(path: Path, name: str, images: np.ndarray) -> np.ndarray:
    run = session(path)
    return np.concatenate([run.run(None, {name: images[i:i + 10]})[0] for i in range(0, len(images), 10)])


def mobilenet_rows(folder: Path) -> tuple[list[list[str]], str | None]:
    """The rows, or none and why (keras missing, or the export failed)."""
    import importlib.util

    if importlib.util.find_spec("keras") is None:
        return [], "Keras MobileNetV2: keras is not installed (pip install 'onnxforge[keras]')"
    from cli_runs import run_cli

    from onnxforge.pipeline.prune.channels import ChannelPruneConfig, prune_channels
    from onnxforge.pipeline.quantize import QuantizeConfig, quantize

    source, exported, model = folder / "mobilenet.py", folder / "mobilenet.onnx", folder / "mobilenet_s.onnx"
    np.save(folder / "mnv2_bn.npy", structured_images(32, seed=2))
    source.write_text(_SOURCE.format(size=SIZE, images=str(folder / "mnv2_bn.npy")))
    for args in (("export", f"{source}:build", "-o", exported), ("simplify", exported, "-o", model)):
        code, _, err, _ = run_cli(*args)
        if code != 0:
            return [], f"Keras MobileNetV2: {args[0]} exited {code}: {err.strip().splitlines()[-1:]}"
    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    calibration = folder / "mnv2_calib.npz"
    np.savez(calibration, **{name: structured_images(64, seed=0)})
    held = structured_images(50, seed=1)
    before = _answers(model, name, held)

    def quality(path: Path) -> str:
        after = _answers(path, name, held)
        agree = float((after.argmax(1) == before.argmax(1)).mean())
        cosine = float(np.mean((after * before).sum(1) / np.maximum(
            np.linalg.norm(after, axis=1) * np.linalg.norm(before, axis=1), 1e-12)))
        return f"top-1 agreement with the input {agree:.0%}, mean cosine {cosine:.4f} (50 held-out images)"

    rows = []
    label = f"Keras MobileNetV2 {SIZE}x{SIZE} (random weights)"
    for stage_name, fn, config in (
        ("quantize", lambda i, o, c: quantize(i, o, calibration, c), QuantizeConfig()),
        ("prune channels", prune_channels, ChannelPruneConfig(calibration_data=calibration)),
    ):
        out = folder / f"mnv2_{len(rows)}.onnx"
        with time_to_result() as took:
            code, result = stage(fn, model, out, config)
        rows.append([label, stage_name, verdict(code, result), speed(result),
                     f"{quality(out)}; took {took[0]:.0f} s ({took[1]:.0f} CPU-s)"])
    return rows, None
