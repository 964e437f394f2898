"""Loading, checking and saving ONNX models, and describing their inputs and outputs.

Protobuf ``ModelProto`` lives at these edges. Loading checks what a user would otherwise meet
later as an obscure onnxruntime failure: a missing or empty file, bytes that are not ONNX, a
graph the checker rejects, external data that is not beside the file, an opset newer than this
onnx knows. Saving is atomic, external data included.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxforge._atomic import atomic_path, named_write_errors, temp_prefix
from onnxforge.errors import InvalidModelError, first_line

__all__ = [
    "TensorSpec",
    "load_model",
    "save_model",
    "input_specs",
    "output_specs",
    "file_sha256",
    "content_sha256",
    "model_file_size",
    "default_opset",
]

_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # leave headroom under protobuf's 2 GB


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its name, its dims (int, or a str for a named dynamic dim, or None), dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def shape_text(self) -> str:
        return "x".join("?" if d is None else str(d) for d in self.shape) or "scalar"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype)}


def _value_info_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = vi.type.tensor_type
    dims: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value == -1:
            dims.append(None)  # PaddleOCR's (paddle2onnx's) way of declaring a dynamic dim; onnxruntime reads it so
        elif d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):
        dtype = np.dtype("O")
    return TensorSpec(vi.name, tuple(dims), dtype)


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Graph inputs that are fed at run time (initializers listed as inputs are skipped)."""
    initializers = {init.name for init in model.graph.initializer}
    return [_value_info_spec(vi) for vi in model.graph.input if vi.name not in initializers]


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_value_info_spec(vi) for vi in model.graph.output]


def default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode() + b"\0" + file_sha256(child).encode())
    return digest.hexdigest()


def _external_data_files(model: onnx.ModelProto) -> set[str]:
    files = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    value = entry.value  # bytes when a damaged file holds invalid UTF-8 (found by fuzzing)
                    files.add(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return files


def model_file_size(path: str | os.PathLike) -> int:
    """Bytes of the .onnx file plus any external-data files it references."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    for name in _external_data_files(model):
        data = path.parent / name
        if data.exists():
            total += data.stat().st_size
    return total


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX file with its external data, raising InvalidModelError with the reason if unusable."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a folder, expected an .onnx file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: file is empty (0 bytes)")
    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-ish errors, ValueError...
        raise InvalidModelError(
            f"{path}: not a readable ONNX model ({type(e).__name__})",
            hint="is the file truncated, or not an .onnx file?",
        ) from e
    if not header.HasField("graph") or not header.opset_import:
        raise InvalidModelError(
            f"{path}: parsed as protobuf but holds no ONNX graph or opset",
            hint="is this an .onnx model file?",
        )
    missing = sorted(n for n in _external_data_files(header) if not (path.parent / n).exists())
    if missing:
        raise InvalidModelError(
            f"{path}: external data file {missing[0]!r} is missing from {path.parent}",
            hint="keep the .onnx and its data file(s) in the same folder",
        )
    known = onnx.defs.onnx_opset_version()
    opset = default_opset(header)
    if opset is not None and opset > known:
        raise InvalidModelError(
            f"{path}: opset {opset} is newer than this onnx ({onnx.__version__}) supports (max {known})",
            hint="upgrade onnx/onnxruntime, or export with a lower --opset",
        )
    if check:
        try:
            onnx.checker.check_model(str(path), full_check=False)
        except Exception as e:  # ValidationError, and e.g. UnicodeDecodeError on a damaged name (found by fuzzing)
            first = first_line(e) or "validation failed"
            raise InvalidModelError(f"{path}: fails the ONNX checker: {type(e).__name__}: {first}") from e
        _check_graph_interface(path, header)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:
        raise InvalidModelError(f"{path}: external data could not be read ({e})") from e
    return model


def _check_graph_interface(path: Path, model: onnx.ModelProto) -> None:
    """What the checker lets through but no runtime can use: no outputs, or negative dims (-1 excepted:
    exporters such as paddle2onnx declare a dynamic dim that way, and onnxruntime accepts it)."""
    if not model.graph.output:
        raise InvalidModelError(f"{path}: the graph declares no outputs", hint="re-export the model")
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.HasField("dim_value") and d.dim_value < -1:
                    raise InvalidModelError(
                        f"{path}: {kind} {vi.name!r} has dimension {axis} = {d.dim_value}; dims must be >= 0 "
                        "(or -1 for a dynamic dim)"
                    )


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Save atomically. Models over ~1.8 GB are written with external data in ``<name>.data``."""
    path = Path(path)
    if model.ByteSize() < _EXTERNAL_DATA_THRESHOLD:
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    # External data: write both files into a private temp folder beside the target, then rename
    # the data first and the graph last, so a reader never sees a graph without its data.
    data_name = path.name + ".data"
    with named_write_errors(path), tempfile.TemporaryDirectory(prefix=temp_prefix(path.name), dir=path.parent) as tmp_dir:
        tmp_model = Path(tmp_dir) / path.name
        onnx.save_model(
            model,
            str(tmp_model),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        for produced in (Path(tmp_dir) / data_name, tmp_model):
            if not produced.exists():  # every tensor under the threshold: no data file is written
                continue
            with open(produced, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(produced, path.parent / produced.name)
    return path


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    return model.ByteSize() < _PROTOBUF_LIMIT
