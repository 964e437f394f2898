"""Rows of the arrays in an ``.npz``/``.npy`` file, read without loading the rest of the file.

``np.load`` of an ``.npz`` is lazy per key, but ``data[key][:64]`` still decodes the whole key first:
a 130,000-sample file costs its full size in memory and time to use 64 samples of it. Here each
array is known by its NumPy header (shape, dtype, order, where its data starts), and a range of rows
is read by seeking to it: in an ``.npy`` file or an uncompressed ``.npz`` member (``np.savez``) the
seek is direct; in a compressed member (``np.savez_compressed``) it decompresses up to the rows,
holding one chunk at a time. Object arrays are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from onnxforge.errors import CalibrationDataError

__all__ = ["StoredArray", "stored_arrays"]

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local file header (30 bytes)


@dataclass(frozen=True)
class StoredArray:
    """One array of a file, by its header: ``rows(start, stop)`` reads just those rows."""

    path: Path
    member: str | None  # the .npz member, None for an .npy file
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # where the array's bytes start, counted from the start of the member

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` (clipped to the array); the whole array when it has no first axis."""
        if self.dtype.hasobject:
            raise CalibrationDataError(
                f"{self.path}: holds Python objects (object dtype), which onnxforge does not unpickle",
                hint="save numeric arrays, e.g. np.savez(path, x=np.asarray(x, dtype=np.float32))",
            )
        if not self.shape or self.fortran_order:  # rows of a Fortran-ordered array are not contiguous
            with _open(self.path, self.member) as (f, base):
                f.seek(base)
                whole = np.lib.format.read_array(f, allow_pickle=False)
            return whole if not self.shape else np.ascontiguousarray(whole[start:stop])
        stop = max(0, min(stop, self.shape[0]))
        start = max(0, min(start, stop))
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        if out.nbytes:
            row_bytes = out.nbytes // (stop - start)
            with _open(self.path, self.member) as (f, base):
                f.seek(base + self.data_offset + start * row_bytes)
                _read_into(f, out.reshape(-1).view(np.uint8).data, self.path)
        return out


def stored_arrays(path: Path) -> dict[str, StoredArray]:
    """Every array of an ``.npz`` (by key) or an ``.npy`` file (under the key ``""``), from the headers.

    Raises CalibrationDataError for a file that is neither (no zip or NumPy header) or is damaged.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise CalibrationDataError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from e
    try:
        if magic == b"\x93NUMPY":
            return {"": _header(path, None)}
        if magic[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):  # a zip, maybe a damaged one
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.namelist() if m.endswith(".npy")]
            return {m[: -len(".npy")]: _header(path, m) for m in members}
    except CalibrationDataError:
        raise
    except Exception as e:  # a damaged zip or header: zipfile, struct and numpy raise their own types
        raise CalibrationDataError(f"{path}: not a readable .npz/.npy file ({type(e).__name__})") from e
    raise CalibrationDataError(
        f"{path}: not an .npz/.npy file (no zip or NumPy header)",
        hint="write it with numpy: np.savez(path, input_name=array)",
    )


def _header(path: Path, member: str | None) -> StoredArray:
    with _open(path, member) as (f, base):
        f.seek(base)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # 3.0 (utf-8 field names): numpy has no public reader for it
            # private, so numpy's stubs leave it out
            shape, fortran, dtype = np.lib.format._read_array_header(f, version)  # type: ignore[attr-defined]
        return StoredArray(path, member, tuple(int(d) for d in shape), np.dtype(dtype), bool(fortran), f.tell() - base)


@contextlib.contextmanager
def _open(path: Path, member: str | None) -> Iterator[tuple[io.BufferedIOBase, int]]:
    """(a binary file, the offset of the array's member in it). An uncompressed .npz member is read
    straight from the archive file, so seeking to a row costs nothing; a compressed one is read
    through zipfile (offset 0), whose forward seek decompresses up to it."""
    if member is None:
        with open(path, "rb") as f:
            yield f, 0
        return
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                if fields[0] != b"PK\x03\x04":
                    raise CalibrationDataError(f"{path}: member {member!r} has a damaged zip header")
                yield f, info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
            return
        with archive.open(member) as f:
            yield cast(io.BufferedIOBase, f), 0  # a ZipExtFile, which is one


def _read_into(f: io.BufferedIOBase, buffer: memoryview, path: Path) -> None:
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise CalibrationDataError(f"{path}: truncated (its header promises more data than it holds)")
        done += n
