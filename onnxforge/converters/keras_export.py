"""Keras 3 -> ONNX. With the torch backend, ``model.export(path, format="onnx")`` works without
TensorFlow (measured with keras 3.15). With the TensorFlow backend Keras exports through tf2onnx,
which the ``tf`` extra installs.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxforge.errors import ExportError

__all__ = ["load_keras_file", "export_keras", "run_keras"]


def _import_keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as e:
        raise ExportError("Keras is not installed", hint="pip install 'onnxforge[keras]'") from e
    return keras


def load_keras_file(path: Path) -> Any:
    keras = _import_keras()
    try:
        return keras.saving.load_model(str(path))
    except Exception as e:
        raise ExportError(f"{path}: Keras could not load it: {type(e).__name__}: {str(e)[:200]}") from e


def export_keras(model: Any) -> onnx.ModelProto:
    keras = _import_keras()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        try:
            import tf2onnx  # noqa: F401
        except ImportError as e:
            raise ExportError(
                "Keras with the TensorFlow backend exports through tf2onnx, which is not installed",
                hint="pip install 'onnxforge[tf]', or set KERAS_BACKEND=torch",
            ) from e
    with tempfile.TemporaryDirectory(prefix="onnxforge-keras-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.export(str(path), format="onnx", verbose=False)
        except Exception as e:
            raise ExportError(f"Keras ONNX export ({backend} backend) failed: {type(e).__name__}: {str(e)[:200]}") from e
        return onnx.load(str(path), load_external_data=True)


def run_keras(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    values = list(feeds.values())
    out = model(values[0] if len(values) == 1 else values, training=False)
    outs = out if isinstance(out, (list, tuple)) else [out]
    keras = _import_keras()
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in outs]
