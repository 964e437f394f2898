"""Output paths: the one guard every command and the runner pass their outputs through before any
work starts, and atomic writes (a temporary file in the destination folder, fsync, rename).

The guard refuses an output that is, or aliases, a file the run reads: the same path, a symlink
to it or a hard link (same inode), an existing file inside a folder it reads, an external-data file of an
input ``.onnx`` model, and the ``<output>.data`` file a large model would be saved with. It
refuses outputs that are not regular files (a FIFO, a device), which a rename would replace;
only a report (``--json``) may be a stream — a pipe, a terminal, ``/dev/stdout`` — and is then
written straight into it, never replaced.

A crash or Ctrl-C leaves either the old file or the complete new one, never half a file, and
the temporary file is removed on failure. An OSError while writing (no space left, read-only
file system, permission denied, name too long) becomes OutputPathError naming the file (exit 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from onnxforge.errors import OutputPathError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_path",
    "is_stream",
    "named_write_errors",
    "os_error",
    "paths_in",
    "write_output_text",
]

# errno values that mean "this output cannot be written here", not "onnxforge has a bug"
WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "ENAMETOOLONG", "ENOTDIR", "EISDIR", "ELOOP")
    if hasattr(errno, name)
)
_HINTS: dict[int | None, str] = {  # looked up by OSError.errno, which may be None
    errno.ENOSPC: "free some space, or write to another folder",
    errno.EROFS: "the file system is read-only: write to another folder",
    errno.EACCES: "check the folder's permissions, or write to another folder",
    errno.EPERM: "check the folder's permissions, or write to another folder",
    errno.ENAMETOOLONG: "use a shorter file name (at most 255 bytes)",
}
_NAME_MAX = 255
# The temp name keeps at most this many bytes of the output's name: ".<name>.<8 random>.tmp" fits 255.
_TEMP_NAME_BYTES = 200
# /dev/stdout, /dev/fd/63 (bash's >(cmd)), /proc/self/fd/1: aliases of an open file descriptor
_FD_ALIAS = re.compile(r"^/(dev/(stdin|stdout|stderr|fd/\d+)|proc/(self|\d+)/fd/\d+)$")


def paths_in(config: object) -> list[Path]:
    """The file paths a (dataclass) config reads: calibration, evaluation and sample data."""
    if not dataclasses.is_dataclass(config):
        return []
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            found.append(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # a DataSpec names its path inside
            found.extend(paths_in(value))
    return found


def write_error(path: str | os.PathLike, error: OSError) -> OutputPathError:
    """The exit-2 error for an OSError met while writing ``path``: the path and the reason."""
    return OutputPathError(f"cannot write {path}: {error.strerror or error}", hint=_HINTS.get(error.errno))


def os_error(error: OSError) -> OutputPathError:
    """The exit-2 error for an OSError met outside our writers: the file it names and the reason."""
    where = f"{error.filename}: " if error.filename else ""
    return OutputPathError(f"{where}{error.strerror or error}", hint=_HINTS.get(error.errno))


@contextlib.contextmanager
def named_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError from writing ``path`` (ENOSPC, EROFS, EACCES, ENAMETOOLONG...) into OutputPathError."""
    try:
        yield
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(path, e) from e
        raise


def is_stream(path: str | os.PathLike) -> bool:
    """True for a pipe, a terminal or another character device, and for an alias of an open file
    descriptor (``/dev/stdout``, ``/dev/fd/N`` as bash's ``>(cmd)`` gives, or a symlink to one)."""
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own symlink limit
        if _FD_ALIAS.match(current):
            return True
        if not os.path.islink(current):
            break
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): the same path once links are resolved
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def _external_data_files(model: Path) -> list[Path]:
    """The external-data files an input .onnx reads (locations relative to its folder)."""
    try:
        import onnx

        header = onnx.load(str(model), load_external_data=False)
    except Exception:  # not readable as ONNX: its loader says so later, with the reason
        return []
    from onnxforge.model_io import _external_data_files as locations

    return [model.parent / name for name in locations(header)]


def _aliased_input(candidate: Path, inputs: Iterable[str | os.PathLike | None]) -> tuple[Path, str] | None:
    """The input ``candidate`` would overwrite, and how; None when it overwrites nothing read."""
    for given in inputs:
        if given is None:
            continue
        path = Path(given)
        if path.is_dir():  # a new file in it is harmless; an existing one may be one of the files read
            if os.path.lexists(candidate) and _inside(candidate, path):
                return path, "in a folder this command reads"
            continue
        if _same_file(candidate, path):
            return path, "an input of this command"
        # An output beside a model it shares a folder with may be one of that model's data files.
        if (
            path.suffix.lower() == ".onnx"
            and path.is_file()
            and os.path.lexists(candidate)
            and _inside(candidate, path.parent)
        ):
            for data in _external_data_files(path):
                if _same_file(candidate, data):
                    return data, f"an external-data file of {path}, an input of this command"
    return None


def check_output_path(
    output: str | os.PathLike,
    *inputs: str | os.PathLike | None,
    written: Iterable[str | os.PathLike | None] = (),
    stream_ok: bool = False,
) -> Path:
    """Refuse ``output`` before any work starts when writing it would lose something; returns it as a Path.

    ``inputs`` are every file or folder the command reads (model, data, source .py, recipe): none
    may be overwritten, directly or through an alias (see the module docstring). ``written`` are
    the command's other outputs, which must differ from this one. With ``stream_ok`` (reports), a
    pipe, terminal or /dev/stdout is accepted and later written into by ``write_output_text``.
    The output's folder is created if missing and must be writable.
    """
    out = Path(output)
    if stream_ok and is_stream(out):
        return out
    if out.is_dir():
        raise OutputPathError(f"output path {out} is a folder, expected a file path")
    if out.exists() and not out.is_file():
        raise OutputPathError(
            f"output path {out} is not a regular file (a pipe, device or socket); onnxforge would replace it",
            hint="write to a file path" + (", or use --json - for stdout" if stream_ok else ""),
        )
    for candidate in (out, out.with_name(out.name + ".data")):
        hit = _aliased_input(candidate, inputs)
        if hit is not None:
            read, what = hit
            writes = "" if candidate == out else f" would write {candidate.name}, which"
            raise OutputPathError(
                f"output path {out}{writes} is {what} ({read}); onnxforge never overwrites its inputs",
                hint="choose another output path",
            )
    for other in written:
        if other is not None and _same_file(out, Path(other)):
            raise OutputPathError(f"output path {out} is also written by this command as {other}",
                                  hint="choose another output path")
    if len(os.fsencode(out.name)) > _NAME_MAX:
        raise OutputPathError(f"cannot write {out}: File name too long", hint=_HINTS[errno.ENAMETOOLONG])
    folder = out.parent if str(out.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create output folder {folder}: {e.strerror}", hint=_HINTS.get(e.errno)) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {folder} is not writable")
    return out


def temp_prefix(name: str) -> str:
    """``.<name>.`` for a temp file or folder beside ``name``, cut so that the temp name fits 255 bytes."""
    short = (
        os.fsencode(name)[:_TEMP_NAME_BYTES].decode("utf-8", "ignore")
        if len(os.fsencode(name)) > _TEMP_NAME_BYTES
        else name
    )
    return f".{short}."


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; on success it is fsynced and renamed over it."""
    dest = Path(destination)
    with named_write_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(dest.name), suffix=".tmp", dir=dest.parent)
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


def write_output_text(destination: str | os.PathLike, text: str) -> None:
    """Write a report: into a stream (pipe, terminal, /dev/stdout) directly, appending, never
    replacing it; into a file atomically."""
    if not is_stream(destination):
        atomic_write_text(destination, text)
        return
    with named_write_errors(destination), open(destination, "a", encoding="utf-8") as f:
        f.write(text)
