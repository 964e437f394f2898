"""One private temp folder per onnxforge process, and the removal of those that killed runs left.

Every temp folder a command makes — ours (onnxforge-quant-*, onnxforge-calib-*, onnxforge-export-*,
...) and the libraries' (onnxruntime's quantization tools) — goes inside
``$TMPDIR/onnxforge-<pid>-XXXXXXXX`` for the length of the command, through ``tempfile.tempdir``
and ``TMPDIR`` (which child processes inherit). A normal end, an error, Ctrl-C or SIGTERM remove
it; a run killed with SIGKILL (or the OOM killer) leaves exactly that one folder, naming its owner.
The next start removes such folders of ours whose process is gone, and never a live one's: the
owner's pid must not exist (``os.kill(pid, 0)``) and the lock the owner holds on a file inside the
folder must be free (a process in another pid namespace sharing this $TMPDIR still holds it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["remove_stale_folders", "scratch_folder"]

_PREFIX = "onnxforge-"
_LOCK = ".owner.lock"
_OWNED = re.compile(r"^onnxforge-(\d+)-[A-Za-z0-9_]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process, alive
        return True
    return True


def _locked(folder: str) -> bool:
    """True while a live process holds the lock file in ``folder`` (released when it dies, however)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the pid alone decides
        return False
    try:
        fd = os.open(os.path.join(folder, _LOCK), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the lock we may just have taken
    return False


def _hold_lock(folder: str) -> int | None:
    try:
        import fcntl

        fd = os.open(os.path.join(folder, _LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_folders(base: str | os.PathLike[str]) -> list[Path]:
    """Remove ``onnxforge-<pid>-*`` folders in ``base`` owned by this user whose process is dead; returns them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        match = _OWNED.match(entry.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid() or _alive(int(match.group(1)))
                or _locked(entry.path)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """Remove stale folders, then make this process's temp folder the default for the block."""
    base = tempfile.gettempdir()
    remove_stale_folders(base)
    try:
        folder = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)
    except OSError:  # an unwritable temp dir: the libraries will say so when they need it
        yield Path(base)
        return
    lock = _hold_lock(folder)
    previous_tempdir, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = folder
    os.environ["TMPDIR"] = folder
    try:
        yield Path(folder)
    finally:
        tempfile.tempdir = previous_tempdir
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        shutil.rmtree(folder, ignore_errors=True)
        if lock is not None:
            os.close(lock)
