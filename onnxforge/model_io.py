"""Loading, checking and saving ONNX models, and describing their inputs and outputs.

Protobuf ``ModelProto`` lives at these edges. Loading checks what a user would otherwise meet
later as an obscure onnxruntime failure: a missing or empty file, bytes that are not ONNX, a
graph the checker rejects, external data that is not beside the file, an opset newer than this
onnx knows. Saving is atomic, external data included.

Models over protobuf's 2 GB cannot be serialized as one message (``SerializeToString``,
``ByteSize``, ``onnx.checker.check_model(model)`` and ``infer_shapes(model)`` all raise
"EncodeError: Failed to serialize proto"). The helpers here take such a model in memory all the
same: :func:`serialized_size` adds up its weights, :func:`runnable` hands onnxruntime or the checker
its bytes, or a temporary copy with its weights in an external-data file, :func:`infer_shapes` infers
on a copy without the weights' bytes, and :func:`save_model` writes external data without clearing
the caller's tensors (``onnx.save_model(save_as_external_data=True)`` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from google.protobuf.message import EncodeError
from onnx import helper

from onnxforge._atomic import atomic_path, named_write_errors, temp_prefix
from onnxforge.errors import InvalidModelError, first_line
from onnxforge.pipeline.codec import JsonResult

__all__ = [
    "TensorSpec",
    "check_model",
    "check_utf8_path",
    "content_sha256",
    "default_opset",
    "file_sha256",
    "fits_in_protobuf",
    "infer_shapes",
    "input_specs",
    "load_model",
    "model_file_size",
    "output_specs",
    "runnable",
    "save_model",
    "serialized_size",
    "stored_at",
]

_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # leave headroom under protobuf's 2 GB
_EXTERNAL_TENSOR_BYTES = 1024  # tensors at least this large go to the external-data file
_MEASURED_BYTES = 64 << 20  # models with fewer weight bytes are measured by ByteSize, exactly
_ALIGNMENT = 4096  # external tensors start on a page: onnxruntime can map them instead of copying
_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}
_NO_RAW_COPY = {onnx.TensorProto.STRING, *_FOUR_BIT}


@dataclass(frozen=True)
class TensorSpec(JsonResult):
    """A graph input or output: its name, its dims (int, or a str for a named dynamic dim, or None), dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def shape_text(self) -> str:
        return "x".join("?" if d is None else str(d) for d in self.shape) or "scalar"


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


def check_utf8_path(path: str | os.PathLike) -> None:
    """Refuse a path whose bytes are not UTF-8 (a Latin-1 name): onnx and onnxruntime take paths as
    UTF-8 strings and cannot open it, which they report as a checker or type error about something else."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise InvalidModelError(f"{shown}: the path is not valid UTF-8; onnx and onnxruntime cannot open it",
                                hint="rename the file (or its folder) to a UTF-8 name, or copy it to one") from None


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX file with its external data, raising InvalidModelError with the reason if unusable."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a folder, expected an .onnx file")
    check_utf8_path(path)
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
    """Save atomically. Models over ~1.8 GB are written with external data in ``<name>.data``;
    ``model`` is left as it was."""
    path = Path(path)
    if serialized_size(model) < _EXTERNAL_DATA_THRESHOLD:
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    # External data: write both files into a private temp folder beside the target, then rename
    # the data first and the graph last, so a reader never sees a graph without its data.
    data_name = path.name + ".data"
    with (
        named_write_errors(path),
        tempfile.TemporaryDirectory(prefix=temp_prefix(path.name), dir=path.parent) as tmp_dir,
    ):
        tmp_model = Path(tmp_dir) / path.name
        _write_with_external_data(model, tmp_model, data_name)
        for produced in (Path(tmp_dir) / data_name, tmp_model):
            if not produced.exists():  # every tensor under the threshold: no data file is written
                continue
            with open(produced, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(produced, path.parent / produced.name)
    return path


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes ``model`` takes as one protobuf message, also past 2 GB (where ``ByteSize`` raises). With
    large weights it is their byte count plus the rest's exact size: upb's ``ByteSize`` serializes the
    whole message to measure it (15 s on a 2.3 GB model)."""
    if sum(_tensor_bytes(t) for t in model.graph.initializer) < _MEASURED_BYTES:
        try:
            return model.ByteSize()
        except EncodeError:  # large Constant nodes or subgraph weights
            pass
    skeleton, weights = _split_weights(model)
    return skeleton.ByteSize() + sum(_tensor_bytes(t) for _, t in weights)


def fits_in_protobuf(model: onnx.ModelProto | str | os.PathLike) -> bool:
    """Whether ``model`` (in memory, or a file with its external data) is under protobuf's 2 GB."""
    if isinstance(model, onnx.ModelProto):
        return serialized_size(model) < _PROTOBUF_LIMIT
    return model_file_size(model) < _PROTOBUF_LIMIT


_SPILLED: dict[int, str] = {}  # id(model) -> its temporary file, while a runnable(model) block is open


@contextlib.contextmanager
def runnable(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """``model`` in a form onnxruntime's InferenceSession and onnx's checker take: its bytes when it fits
    in one protobuf, else the path of a temporary copy whose weights are in an external-data file
    beside it (removed on exit; a session made from it keeps working). Inside the block, ``model`` must
    not change: a nested ``runnable(model)`` (check_model, Target.session) reuses that file."""
    if id(model) in _SPILLED:
        yield _SPILLED[id(model)]
        return
    if fits_in_protobuf(model):
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnxforge-large-") as tmp:
        path = Path(tmp) / "model.onnx"
        _write_with_external_data(model, path, "model.onnx.data")
        _SPILLED[id(model)] = str(path)
        try:
            yield str(path)
        finally:
            del _SPILLED[id(model)]


@contextlib.contextmanager
def stored_at(model: onnx.ModelProto, path: str | os.PathLike) -> Iterator[None]:
    """Within the block, ``runnable(model)`` hands over ``path``, a file that holds ``model`` as it is
    (the stage's input, loaded and not normalized), instead of writing a copy of a model past 2 GB."""
    if id(model) in _SPILLED:
        yield
        return
    _SPILLED[id(model)] = str(path)
    try:
        yield
    finally:
        del _SPILLED[id(model)]


def check_model(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker.check_model``, also for a model past 2 GB (checked from a temporary file)."""
    if id(model) not in _SPILLED and fits_in_protobuf(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    with runnable(model) as path:
        onnx.checker.check_model(path, full_check=full_check)


def infer_shapes(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(model, **options)``, also for a model past 2 GB: inference
    then runs on a copy whose large weights are bare names, types and dims (inference reads no weight
    bytes but those of small shape tensors, kept), and its value_info, outputs and nodes (subgraphs'
    value_info) are put into a copy of ``model``."""
    if fits_in_protobuf(model):
        return onnx.shape_inference.infer_shapes(model, **options)
    skeleton, _ = _split_weights(model)
    inferred = onnx.shape_inference.infer_shapes(skeleton, **options)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for name in ("value_info", "output", "node"):
        field = getattr(result.graph, name)
        del field[:]
        field.extend(getattr(inferred.graph, name))
    return result


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's data bytes, counted from its dims where it holds raw bytes (without copying them)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    if tensor.HasField("raw_data"):
        try:
            bits = (
                4
                if tensor.data_type in _FOUR_BIT
                else 8 * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            )
        except (KeyError, TypeError, ValueError):  # a data type this onnx does not know: measure it
            return tensor.ByteSize()
        return -(-int(np.prod(tensor.dims, dtype=np.int64)) * bits // 8)
    return tensor.ByteSize()


def _split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[onnx.TensorProto, onnx.TensorProto]]]:
    """(a copy of ``model`` whose top-level initializers of at least _EXTERNAL_TENSOR_BYTES are stubs
    marked external with no location yet, [(stub, the model's own tensor)]): the copy never holds those
    weights' bytes, so building it costs no memory for them."""
    skeleton = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(skeleton, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(skeleton.graph, field, value)
    weights = []
    for tensor in model.graph.initializer:
        # raw bytes only: strings have none, and 4-bit types kept in typed fields would unpack to a byte each
        movable = tensor.data_location != onnx.TensorProto.EXTERNAL and (
            tensor.HasField("raw_data") or tensor.data_type not in _NO_RAW_COPY)
        if not movable or _tensor_bytes(tensor) < _EXTERNAL_TENSOR_BYTES:
            skeleton.graph.initializer.add().CopyFrom(tensor)
            continue
        stub = skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                              doc_string=tensor.doc_string)
        stub.data_location = onnx.TensorProto.EXTERNAL
        weights.append((stub, tensor))
    return skeleton, weights


def _copy_field(message, field, value) -> None:
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
    if repeated:
        getattr(message, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """``model`` at ``path`` with its large top-level initializers in ``path.parent / data_name``
    (page-aligned, one tensor at a time), ``model`` itself unchanged."""
    skeleton, weights = _split_weights(model)
    offset = 0
    if weights:
        with open(path.parent / data_name, "wb") as f:
            for stub, tensor in weights:
                data = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
                offset = -(-offset // _ALIGNMENT) * _ALIGNMENT
                f.seek(offset)
                f.write(data)
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                    stub.external_data.add(key=key, value=value)
                offset += len(data)
    path.write_bytes(skeleton.SerializeToString())
