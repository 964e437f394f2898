"""How the stage cache lies on disk, and the only ways it is changed: what is provably an entry,
creating private folders and files, and removing entries and records — never through a link.

``<root>/<key[:2]>/<key>/{model.onnx[, model.onnx.data], entry.json}``, ``<root>/records/<kind>/<key>.json``
and ``<root>/settings.json``. Anything else under the root is not ours: it is counted, never removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from onnxforge.pipeline.cache_trust import private, read_private

__all__ = [
    "ENTRY_NAME",
    "FORMAT",
    "KEY",
    "MODEL_FILES",
    "MODEL_NAME",
    "RECORDS",
    "RECORD_NAME",
    "SETTINGS_NAME",
    "clear_records",
    "discard",
    "entry_bytes",
    "last_use",
    "private_dir",
    "provable_entry",
    "scan",
    "write_private",
]

ENTRY_NAME = "entry.json"
RECORDS = "records"
SETTINGS_NAME = "settings.json"
MODEL_NAME = "model.onnx"
FORMAT = "onnxforge-cache/2"
OUR_FORMATS = ("onnxforge-cache/1", FORMAT)  # what clear() and eviction accept as proof of an entry
MODEL_FILES = frozenset({MODEL_NAME, MODEL_NAME + ".data"})
SHARD = re.compile(r"[0-9a-f]{2}")
KEY = re.compile(r"[0-9a-f]{64}")
RECORD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")
_OURS_IN_PASSING = (".publish-", ".trash-", ".tmp-")  # a concurrent run's work in progress


def scan(root: Path) -> tuple[list[Path], int]:
    """(the provable entries under ``root``, the number of other items left alone there)."""
    if not root.is_dir():
        return [], 0
    entries, unknown = [], 0
    for name in listdir(root):
        shard = root / name
        if name in (RECORDS, SETTINGS_NAME) or name.startswith(_OURS_IN_PASSING):
            continue
        if not (SHARD.fullmatch(name) and private(shard, directory=True)):
            unknown += 1  # a two-letter folder of someone else's, a link: never descended into
            continue
        for child in listdir(shard):
            if child.startswith(_OURS_IN_PASSING):
                continue
            if provable_entry(shard / child):
                entries.append(shard / child)
            else:
                unknown += 1
    return entries, unknown


def listdir(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def provable_entry(folder: Path) -> bool:
    """Whether ``folder`` is certainly a cache entry: ``<2 hex>/<64 hex>``, a real folder of ours holding
    only entry files (real files of ours), with an ``entry.json`` of our format naming its key."""
    name = folder.name
    if not (KEY.fullmatch(name) and name[:2] == folder.parent.name and private(folder, directory=True)):
        return False
    names = set(listdir(folder))
    if ENTRY_NAME not in names or not names <= {*MODEL_FILES, ENTRY_NAME}:
        return False
    if not all(private(folder / n, directory=False) for n in names):
        return False
    try:
        entry = json.loads(read_private(folder / ENTRY_NAME))
    except (OSError, ValueError):
        return False
    return isinstance(entry, dict) and entry.get("format") in OUR_FORMATS and entry.get("key") == name


def entry_bytes(folder: Path) -> int:
    return sum(os.lstat(folder / n).st_size for n in listdir(folder))


def last_use(folder: Path) -> int:
    try:
        return os.lstat(folder / ENTRY_NAME).st_mtime_ns
    except OSError:
        return 0


def private_dir(folder: Path) -> None:
    """Create ``folder`` 0700 when missing (its parents as usual)."""
    if os.path.lexists(folder):
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` 0600 through a temporary file and a rename (which replaces a planted
    link rather than following it)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clear_records(records: Path) -> None:
    """Remove our record files (real files of ours that parse as records), then the folders left empty."""
    if not private(records, directory=True):
        return
    for kind in listdir(records):
        if not private(records / kind, directory=True):
            continue
        for name in listdir(records / kind):
            path = records / kind / name
            try:
                stored = json.loads(read_private(path))
            except (OSError, ValueError):
                continue
            if isinstance(stored, dict) and stored.get("format") in OUR_FORMATS:
                path.unlink(missing_ok=True)
        try:
            os.rmdir(records / kind)
        except OSError:
            pass
    try:
        os.rmdir(records)
    except OSError:
        pass


def discard(folder: Path) -> None:
    """Remove an entry folder: only a real folder of ours inside a private shard (never a link)."""
    if not (private(folder.parent, directory=True) and private(folder, directory=True)):
        return
    # Rename first so a concurrent reader never sees half-deleted files under the key.
    trash = folder.with_name(f".trash-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)  # rmtree never follows links inside it
