"""Atomic file output: write to a temporary file in the destination folder, fsync, rename.

A crash or Ctrl-C leaves either the old file or the complete new one, never half a file, and
the temporary file is removed on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from onnxforge.errors import OutputPathError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_output_path", "paths_in"]


def paths_in(config: object) -> list[Path]:
    """The file paths a (dataclass) config reads: calibration, evaluation and sample data."""
    if not dataclasses.is_dataclass(config):
        return []
    return [v for f in dataclasses.fields(config) if isinstance(v := getattr(config, f.name), Path)]


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Resolve ``output`` and refuse paths that equal an input or whose folder cannot be written.

    ``inputs`` are every file the command reads (model, data, source .py): none may be overwritten.
    """
    out = Path(output)
    if out.exists() and out.is_dir():
        raise OutputPathError(f"output path {out} is a folder, expected a file path")
    for given in inputs:
        if given is not None and Path(given).exists() and out.exists() and os.path.samefile(given, out):
            raise OutputPathError(
                f"output path {out} is an input of this command ({given}); onnxforge never overwrites its inputs",
                hint="choose another output path",
            )
    folder = out.parent if str(out.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create output folder {folder}: {e.strerror}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {folder} is not writable")
    return out


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; on success it is fsynced and renamed over it."""
    dest = Path(destination)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus the umask).
    os.fchmod(fd, 0o666 & ~_current_umask())
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(destination: str | os.PathLike, data: bytes) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(destination: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(destination, text.encode("utf-8"))
