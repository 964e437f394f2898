"""Keras 3 -> ONNX. With the torch backend, ``model.export(path, format="onnx")`` works without
TensorFlow (measured with keras 3.15); Keras then uses the TorchScript exporter with a dynamic
batch whenever an input's batch dim is None. With the TensorFlow backend Keras exports through
tf2onnx, which the ``tf`` extra installs.

Names: Keras names the ONNX inputs after its Input layers, flattened in ``tree.flatten`` order
(a dict of inputs comes out sorted by key, not in the dict's order), and leaves the outputs with
numbered names; we rename the outputs to ``model.output_names`` and feed the model back by name.
The TorchScript exporter names an output's batch dim after the op that made it (``Add485_dim_0``);
axis 0 of every Keras output is the batch, so it takes the inputs' name for it (``batch``).
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

from onnxforge.converters._silence import silent_fds
from onnxforge.errors import ExportError

__all__ = ["export_keras", "keras_input_names", "load_keras_file", "run_keras"]

_TF_HINT = "install the 'tf' extra (TensorFlow and tf2onnx): pip install 'onnxforge[tf]'; or set KERAS_BACKEND=torch"


def _import_keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as e:
        if os.environ.get("KERAS_BACKEND") == "tensorflow":
            raise ExportError(
                "KERAS_BACKEND=tensorflow, but TensorFlow is not installed: Keras cannot load, and ONNX export "
                "with this backend needs the 'tf' extra",
                hint=_TF_HINT,
            ) from e
        raise ExportError("Keras is not installed", hint="pip install 'onnxforge[keras]'") from e
    return keras


def load_keras_file(path: Path) -> Any:
    keras = _import_keras()
    try:
        return keras.saving.load_model(str(path), safe_mode=True)  # no Lambda bytecode from the file
    except Exception as e:
        raise ExportError(f"{path}: Keras could not load it: {type(e).__name__}: {str(e)[:200]}") from e


def keras_input_names(model: Any) -> list[str]:
    """The model's input names in the order Keras flattens them for export."""
    keras = _import_keras()
    struct = getattr(model, "_inputs_struct", None)
    inputs = keras.tree.flatten(struct) if struct is not None else list(getattr(model, "inputs", None) or [])
    return [getattr(t, "name", f"input_{i}") for i, t in enumerate(inputs)]


def _input_struct(model: Any) -> Any:
    """The model's symbolic inputs: a functional model's structure, or a built Sequential's inputs."""
    struct = getattr(model, "_inputs_struct", None)
    if struct is None and getattr(model, "built", False):
        try:
            inputs = model.inputs  # a Sequential built from keras.Input (or .build()) has them
        except (AttributeError, ValueError):
            inputs = None
        struct = inputs[0] if inputs and len(inputs) == 1 else inputs
    return struct


def _ensure_called(model: Any) -> None:
    """Keras refuses to export a model that has never been called; a functional model, or a
    Sequential that starts with keras.Input, has not been until it sees data. Call it once on
    zeros of its input shapes (None dims as 1)."""
    keras = _import_keras()
    if getattr(model, "_called", True):
        return
    struct = _input_struct(model)
    if struct is None:
        if isinstance(model, keras.Sequential) and not model.built:
            raise ExportError(
                "the Keras Sequential model has no input shape, so it cannot be exported",
                hint="start it with keras.Input(shape=...), or call model.build((None, ...)) before returning it",
            )
        return
    zeros = keras.tree.map_structure(
        lambda t: np.zeros([1 if d is None else d for d in t.shape], dtype=getattr(t, "dtype", "float32")),
        struct,
    )
    try:
        model(zeros, training=False)
    except Exception as e:
        raise ExportError(
            f"the Keras model failed on zeros of its input shapes: {type(e).__name__}: {str(e)[:200]}"
        ) from e


def _rename_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    old = [o.name for o in proto.graph.output]
    taken = {i.name for i in proto.graph.input} | {n for node in proto.graph.node for n in node.output} - set(old)
    if len(names) != len(old) or len(set(names)) != len(names) or set(names) & taken:
        return
    mapping = dict(zip(old, names, strict=True))
    for node in proto.graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for value in list(proto.graph.output) + list(proto.graph.value_info):
        value.name = mapping.get(value.name, value.name)


def _name_output_batch(proto: onnx.ModelProto) -> None:
    """Name axis 0 of the outputs after the inputs' batch dim, when every input calls it the same.

    Keras outputs are batch-first, so a dim the exporter named after an op (``Add485_dim_0``) there is
    the batch; its name is replaced wherever it appears (outputs and value_info alike).
    """
    firsts = {i.type.tensor_type.shape.dim[0].dim_param if i.type.tensor_type.shape.dim else ""
              for i in proto.graph.input}
    if len(firsts) != 1 or not (batch := firsts.pop()):
        return
    input_dims = {d.dim_param for i in proto.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    renamed = {}
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and dims[0].dim_param not in input_dims:
            renamed[dims[0].dim_param] = batch
    for value in [*proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renamed:
                dim.dim_param = renamed[dim.dim_param]


def export_keras(model: Any, config: Any = None) -> onnx.ModelProto:
    """Export a keras.Model with ``model.export(format="onnx")``; the batch stays dynamic where
    the Keras inputs leave it None."""
    keras = _import_keras()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        try:
            import tf2onnx  # noqa: F401
        except ImportError as e:
            raise ExportError(
                "Keras with the TensorFlow backend exports through tf2onnx, which is not installed", hint=_TF_HINT
            ) from e
    if not isinstance(model, keras.Model):
        raise ExportError(f"got a {type(model).__name__}, not a keras.Model")
    _ensure_called(model)
    with tempfile.TemporaryDirectory(prefix="onnxforge-keras-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), silent_fds():
                warnings.simplefilter("ignore")
                kwargs = (
                    {"opset_version": config.opset} if config is not None and getattr(config, "opset", None) else {}
                )
                model.export(str(path), format="onnx", verbose=False, **kwargs)
        except Exception as e:
            raise ExportError(
                f"Keras ONNX export ({backend} backend) failed: {type(e).__name__}: {str(e)[:200]}"
            ) from e
        proto = onnx.load(str(path), load_external_data=True)
    output_names = list(getattr(model, "output_names", None) or [])
    if not output_names and all(o.name.isdigit() for o in proto.graph.output):
        # a Sequential has no output names; the exporter's are node numbers ("21")
        count = len(proto.graph.output)
        output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    if output_names:
        _rename_outputs(proto, output_names)
    _name_output_batch(proto)
    return proto


def run_keras(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the Keras model on feeds keyed by ONNX input name, packed into its own input structure.

    ONNX names equal to the Keras input names are matched by name; otherwise by position in
    Keras's flatten order (the order ``model.export`` used)."""
    keras = _import_keras()
    names = keras_input_names(model)
    if set(feeds) == set(names):
        flat = [feeds[n] for n in names]
    elif len(feeds) == len(names):
        flat = list(feeds.values())
    else:
        raise ExportError(f"the ONNX model has {len(feeds)} inputs, the Keras model {len(names)} ({', '.join(names)})")
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        inputs = keras.tree.pack_sequence_as(struct, flat)
    else:
        inputs = flat[0] if len(flat) == 1 else flat
    out = model(inputs, training=False)
    outs = keras.tree.flatten(out)
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in outs]
