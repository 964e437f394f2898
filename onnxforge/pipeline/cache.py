"""A content-addressed cache of stage outputs, shared by every run folder and every search trial.

The key of a stage is the sha256 of (the pass name, its full config through the codec with data
files replaced by their content hash, the sha256 of each input artifact, the recipe-level data it
reads, the target and the tool versions that change outputs). An entry is a folder
``<root>/<key[:2]>/<key>/`` holding the output model and ``entry.json`` (the stage's result and the
sha256 of every file in the entry).

- Reuse verifies every file's hash first: a tampered or damaged entry is removed and recomputed,
  and the caller is told so (``CacheLookup.reason``).
- Publishing is atomic: an entry is written into a private temporary folder and renamed into place;
  when two runs race on one key, the first rename wins and the other's copy is dropped — both
  entries were computed from the same inputs, so either is right.
- Beside the entries it keeps small *records* (``<root>/records/<kind>/<key>.json``): measurements a
  re-run may reuse, such as quantize's candidate timings (so that the scheme it keeps does not flip
  with the machine's load). A record carries the sha256 of its data; one that does not match is
  removed and ignored.
- The root is ``$ONNXFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxforge``, else ``~/.cache/onnxforge``;
  ``--cache-dir`` overrides it, and ``--no-cache`` (``StageCache(None)``) turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxforge._atomic import atomic_path, atomic_write_text
from onnxforge.model_io import file_sha256, load_model, save_model

__all__ = ["StageCache", "CacheLookup", "default_cache_dir", "stage_key", "code_fingerprint"]

ENTRY_NAME = "entry.json"
RECORDS = "records"
MODEL_NAME = "model.onnx"
_FORMAT = "onnxforge-cache/1"


def default_cache_dir() -> Path:
    if os.environ.get("ONNXFORGE_CACHE_DIR"):
        return Path(os.environ["ONNXFORGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxforge"


def stage_key(payload: dict[str, Any]) -> str:
    """sha256 of ``payload`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """sha256 of onnxforge's own source files: a changed onnxforge never serves results of the old one,
    even when its version number did not change (an editable install, a local fix)."""
    import onnxforge

    root = Path(onnxforge.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _external_files(model_path: Path) -> list[Path]:
    data = model_path.with_name(model_path.name + ".data")
    return [data] if data.exists() else []


@dataclass
class CacheLookup:
    """The outcome of a look-up: ``entry`` when a verified entry exists; else why not (``reason``)."""

    key: str
    entry: dict[str, Any] | None = None
    folder: Path | None = None
    reason: str = "not cached"

    @property
    def hit(self) -> bool:
        return self.entry is not None


class StageCache:
    """See the module docstring. ``StageCache(None)`` is a cache that never hits and never stores."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None

    @classmethod
    def default(cls) -> StageCache:
        return cls(default_cache_dir())

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _folder(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / key

    def lookup(self, key: str) -> CacheLookup:
        """The verified entry for ``key``; a damaged or tampered entry is removed and reported."""
        if self.root is None:
            return CacheLookup(key, reason="cache off")
        folder = self._folder(key)
        try:
            entry = json.loads((folder / ENTRY_NAME).read_text())
        except FileNotFoundError:
            return CacheLookup(key)
        except (OSError, ValueError):
            self._discard(folder)
            return CacheLookup(key, reason="cached entry unreadable; recomputed")
        problem = self._verify(folder, entry, key)
        if problem:
            self._discard(folder)
            return CacheLookup(key, reason=f"cached entry {problem}; recomputed")
        return CacheLookup(key, entry, folder, reason="cached")

    @staticmethod
    def _verify(folder: Path, entry: Any, key: str) -> str | None:
        if not isinstance(entry, dict) or entry.get("format") != _FORMAT or entry.get("key") != key:
            return "has another format or key"
        files = entry.get("files")
        if not isinstance(files, dict) or MODEL_NAME not in files:
            return "lists no model"
        for name, digest in files.items():
            path = folder / name
            if not path.is_file():
                return f"is missing {name}"
            if file_sha256(path) != digest:
                return f"was modified ({name} does not match its recorded sha256)"
        return None

    def _discard(self, folder: Path) -> None:
        # Rename first so a concurrent reader never sees half-deleted files under the key.
        trash = folder.with_name(f".trash-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def restore(self, lookup: CacheLookup, destination: Path) -> None:
        """Copy the cached model of a hit to ``destination`` (atomically; external data renamed to match)."""
        assert lookup.folder is not None
        source = lookup.folder / MODEL_NAME
        if _external_files(source):
            save_model(load_model(source, check=False), destination)
            return
        with atomic_path(destination) as tmp:
            shutil.copyfile(source, tmp)

    def entries(self) -> list[Path]:
        """The entry folders under the root (published ones: ``<key[:2]>/<key>``)."""
        if self.root is None or not self.root.is_dir():
            return []
        return [p for p in self.root.glob("??/*") if p.is_dir() and not p.name.startswith(".")]

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) held by the cache."""
        entries = self.entries()
        return len(entries), sum(f.stat().st_size for e in entries for f in e.iterdir() if f.is_file())

    def clear(self) -> int:
        """Remove every entry (each renamed away first, so a concurrent reader sees it whole or not at all)
        and every record."""
        entries = self.entries()
        for folder in entries:
            self._discard(folder)
        if self.root is not None and (self.root / RECORDS).is_dir():
            self._discard(self.root / RECORDS)
        return len(entries)

    def _record_path(self, kind: str, key: str) -> Path:
        assert self.root is not None
        return self.root / RECORDS / kind / f"{key}.json"

    def record(self, kind: str, key: str) -> Any:
        """The data recorded under ``kind``/``key``; None when there is none, the cache is off, or the
        record does not match its sha256 (then it is removed)."""
        if self.root is None:
            return None
        path = self._record_path(kind, key)
        try:
            stored = json.loads(path.read_text())
            data = stored["data"]
            intact = stored.get("format") == _FORMAT and stored.get("key") == key and stored.get("sha256") == _digest(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            path.unlink(missing_ok=True)
            return None
        return data

    def save_record(self, kind: str, key: str, data: Any) -> None:
        """Record ``data`` (JSON) under ``kind``/``key``, atomically; a no-op when the cache is off."""
        if self.root is None:
            return
        path = self._record_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {"format": _FORMAT, "key": key, "sha256": _digest(data), "data": data}
        atomic_write_text(path, json.dumps(stored, sort_keys=True) + "\n")

    def publish(self, key: str, model_path: Path, record: dict[str, Any]) -> None:
        """Store ``model_path`` (and its external data) with ``record`` under ``key``; atomic, race-safe."""
        if self.root is None:
            return
        final = self._folder(key)
        if final.exists():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=final.parent))
        try:
            if _external_files(model_path):
                save_model(load_model(model_path, check=False), tmp / MODEL_NAME)
            else:
                shutil.copyfile(model_path, tmp / MODEL_NAME)
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            entry = {"format": _FORMAT, "key": key, "files": files, **record}
            atomic_write_text(tmp / ENTRY_NAME, json.dumps(entry, indent=1, default=str) + "\n")
            try:
                os.rename(tmp, final)  # fails when another run published the key first: theirs is as good
            except OSError:
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
