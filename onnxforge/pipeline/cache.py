"""A content-addressed cache of stage outputs, shared by every run folder and every search trial.

The key of a stage is the sha256 of (the pass name, its full config through the codec with data
files replaced by their content hash, the sha256 of each input artifact, the recipe-level data it
reads, the target and the tool versions that change outputs). An entry is a folder
``<root>/<key[:2]>/<key>/`` holding the output model and ``entry.json`` (the stage's result, the
sha256 of every file in the entry, and an HMAC of both under the user's cache key).

- The cache may sit on a shared disk: see ``cache_trust`` for the threat model. Nothing inside it is
  followed through a link; shards, entries and files must be the user's own and not writable by
  others; an entry (or record, or setting) is served only when its HMAC matches. A root others may
  write without the sticky bit, or a key file that cannot be used, turns the cache off for the run
  (one warning).
- Reuse verifies the signature and every file's hash first: a tampered, re-hashed or damaged entry
  is removed and recomputed, and the caller is told so (``CacheLookup.reason``).
- Publishing is atomic: an entry is written into a private temporary folder and renamed into place;
  when two runs race on one key, the first rename wins and the other's copy is dropped — both
  entries were computed from the same inputs, so either is right. A cache that cannot be written
  (read-only, full, no permission) is a warning and the run goes on without it.
- It has a size cap (``max_size()``: ``<root>/settings.json``, set by ``onnxforge cache --max-size``,
  else ``$ONNXFORGE_CACHE_MAX_SIZE``, else 2 GiB). After each publish the least recently used entries
  (a hit counts as a use) are removed until it fits.
- ``clear()`` and eviction remove only what is provably an entry (``<2 hex>/<64 hex>``, a real folder
  of the user's, holding only entry files, with an ``entry.json`` of this format); anything else is
  left alone and counted.
- Beside the entries it keeps small signed *records* (``<root>/records/<kind>/<key>.json``):
  measurements a re-run may reuse, such as quantize's candidate timings (so that the scheme it keeps
  does not flip with the machine's load) and the run report's per-op profiles (so that an unchanged
  stage is not profiled again), both through ``recorded``. A record that does not match its signature
  is removed and ignored.
- The root is ``$ONNXFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxforge``, else ``~/.cache/onnxforge``;
  ``--cache-dir`` overrides it, and ``--no-cache`` (``StageCache(None)``) turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from tempfile import mkdtemp
from typing import Any, TypeVar

from onnxforge._atomic import atomic_path
from onnxforge.errors import CacheError, OnnxForgeError
from onnxforge.model_io import file_sha256, load_model, save_model
from onnxforge.pipeline.cache_layout import (
    ENTRY_NAME,
    FORMAT,
    KEY,
    MODEL_FILES,
    MODEL_NAME,
    RECORD_NAME,
    RECORDS,
    SETTINGS_NAME,
    clear_records,
    discard,
    entry_bytes,
    last_use,
    listdir,
    private_dir,
    scan,
    write_private,
)
from onnxforge.pipeline.cache_trust import (
    DEGRADE_ERRNOS,
    key_file,
    load_secret,
    open_private,
    private,
    private_sha256,
    read_private,
    root_problem,
    sign,
    signed_by,
)

__all__ = ["DEFAULT_MAX_SIZE", "CacheLookup", "StageCache", "code_fingerprint", "default_cache_dir", "stage_key"]

DEFAULT_MAX_SIZE = 2 << 30

_log = logging.getLogger(__name__)
_LOGGED: set[str] = set()


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def default_cache_dir() -> Path:
    if os.environ.get("ONNXFORGE_CACHE_DIR"):
        return Path(os.environ["ONNXFORGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxforge"


def stage_key(payload: dict[str, Any]) -> str:
    """sha256 of ``payload`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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
    """See the module docstring. ``StageCache(None)`` is a cache that never hits and never stores.

    ``warnings`` holds each distinct warning once (also logged): why the cache is not used for this run.
    """

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None
        self.warnings: list[str] = []
        self._secret: bytes | None = None
        self._off = False

    @classmethod
    def default(cls) -> StageCache:
        return cls(default_cache_dir())

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
        if message not in _LOGGED:  # once per process: a search builds a StageCache per trial
            _LOGGED.add(message)
            _log.warning("warning: %s", message)

    def _turn_off(self, why: str) -> None:
        self._off = True
        self._warn(f"the stage cache {self.root} {why}: running without it")

    def _usable(self) -> bool:
        """Whether the cache may be read and written (checks the root and loads the key, once)."""
        if self.root is None or self._off:
            return False
        if self._secret is None:
            problem = root_problem(self.root)
            if problem is None:
                try:
                    self._secret = load_secret()
                except OSError as e:
                    problem = f"has an unusable key file {e.filename or key_file()} ({e.strerror})"
            if problem:
                self._turn_off(problem)
                return False
        return True

    def _folder(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / key

    # ------------------------------------------------------------------------------------------
    # look-up and restore

    def lookup(self, key: str) -> CacheLookup:
        """The verified entry for ``key``; a damaged or tampered entry is removed and reported."""
        if not self._usable():
            return CacheLookup(key, reason="cache off")
        folder = self._folder(key)
        if not os.path.lexists(folder.parent):
            return CacheLookup(key)
        if not (KEY.fullmatch(key) and private(folder.parent, directory=True)):
            return CacheLookup(key, reason="cache shard is not a private folder of yours; ignored")
        if not os.path.lexists(folder):
            return CacheLookup(key)
        if not private(folder, directory=True):
            return CacheLookup(key, reason="cached entry is not a private folder of yours; ignored")
        try:
            entry = json.loads(read_private(folder / ENTRY_NAME))
        except (OSError, ValueError):
            discard(folder)
            return CacheLookup(key, reason="cached entry unreadable; recomputed")
        problem = self._verify(folder, entry, key)
        if problem:
            discard(folder)
            return CacheLookup(key, reason=f"cached entry {problem}; recomputed")
        try:  # the last use, for eviction
            os.utime(folder / ENTRY_NAME, follow_symlinks=False)
        except OSError:
            pass
        return CacheLookup(key, entry, folder, reason="cached")

    def _verify(self, folder: Path, entry: Any, key: str) -> str | None:
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
            return "has another format or key"
        files = entry.get("files")
        if not isinstance(files, dict) or MODEL_NAME not in files or not set(files) <= MODEL_FILES:
            return "lists no model"
        assert self._secret is not None
        if not signed_by(self._secret, {k: v for k, v in entry.items() if k != "hmac"}, entry.get("hmac")):
            return "is not signed by your cache key (planted or re-hashed)"
        if set(listdir(folder)) != {*files, ENTRY_NAME}:
            return "holds other files than it lists"
        for name, digest in files.items():
            try:
                actual = private_sha256(folder / name)
            except FileNotFoundError:
                return f"is missing {name}"
            except OSError:
                return f"holds {name} as a link or a file others can write"
            if actual != digest:
                return f"was modified ({name} does not match its recorded sha256)"
        return None

    def restore(self, lookup: CacheLookup, destination: Path) -> None:
        """Copy the cached model of a hit to ``destination`` (atomically; external data renamed to match)."""
        assert lookup.folder is not None and lookup.entry is not None
        source = lookup.folder / MODEL_NAME
        if MODEL_NAME + ".data" in lookup.entry["files"]:
            save_model(load_model(source, check=False), destination)
            return
        with os.fdopen(open_private(source), "rb") as src, atomic_path(destination) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    # ------------------------------------------------------------------------------------------
    # what the cache holds, clearing and eviction

    def entries(self) -> list[Path]:
        """The entry folders under the root (published ones: ``<key[:2]>/<key>``)."""
        return scan(self.root)[0] if self.root is not None else []

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) held by the cache."""
        entries = self.entries()
        return len(entries), sum(entry_bytes(e) for e in entries)

    def clear(self) -> tuple[int, int]:
        """Remove every entry and record (each entry renamed away first, so a concurrent reader sees it
        whole or not at all). Returns (entries removed, other items left alone). A root others may
        write without the sticky bit is left untouched."""
        if self.root is None or root_problem(self.root):
            if self.root is not None:
                self._warn(f"the stage cache {self.root} {root_problem(self.root)}: nothing removed")
            return 0, 0
        entries, unknown = scan(self.root)
        for folder in entries:
            discard(folder)
        clear_records(self.root / RECORDS)
        return len(entries), unknown

    def _evict(self) -> None:
        """Remove the least recently used entries until the cache fits its cap."""
        cap = self.max_size()
        entries = [(last_use(e), e.name, e, entry_bytes(e)) for e in self.entries()]
        total = sum(size for *_, size in entries)
        for *_, folder, size in sorted(entries):
            if total <= cap:
                break
            discard(folder)
            total -= size

    # ------------------------------------------------------------------------------------------
    # the size cap, kept signed in <root>/settings.json

    def max_size(self) -> int:
        """The cap in bytes: the signed setting, else ``$ONNXFORGE_CACHE_MAX_SIZE``, else 2 GiB."""
        if self._usable():
            assert self.root is not None and self._secret is not None
            try:
                stored = json.loads(read_private(self.root / SETTINGS_NAME))
                unsigned = {k: v for k, v in stored.items() if k != "hmac"}
                if signed_by(self._secret, unsigned, stored.get("hmac")) and isinstance(stored["max_size"], int):
                    return stored["max_size"]
                self._warn(f"{self.root / SETTINGS_NAME} is not signed by your cache key: ignored")
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._warn(f"{self.root / SETTINGS_NAME} is not a readable file of yours: ignored")
        if os.environ.get("ONNXFORGE_CACHE_MAX_SIZE"):
            from onnxforge.pipeline.quantize.calibration_memory import parse_memory_size

            return parse_memory_size(os.environ["ONNXFORGE_CACHE_MAX_SIZE"], "ONNXFORGE_CACHE_MAX_SIZE")
        return DEFAULT_MAX_SIZE

    def set_max_size(self, size: int) -> None:
        """Keep ``size`` (bytes) as this cache's cap and evict down to it. Raises CacheError when the
        cache is not usable or cannot be written."""
        if not self._usable():
            raise CacheError(self.warnings[-1] if self.warnings else "the stage cache is off")
        assert self.root is not None and self._secret is not None
        settings = {"format": FORMAT, "max_size": int(size)}
        try:
            private_dir(self.root)
            write_private(self.root / SETTINGS_NAME, json.dumps({**settings, "hmac": sign(self._secret, settings)}))
        except OSError as e:
            raise CacheError(f"cannot write {self.root / SETTINGS_NAME}: {e.strerror}") from e
        self._evict()

    # ------------------------------------------------------------------------------------------
    # records

    def _record_path(self, kind: str, key: str) -> Path | None:
        if self.root is None or not (RECORD_NAME.fullmatch(kind) and RECORD_NAME.fullmatch(key)):
            return None
        return self.root / RECORDS / kind / f"{key}.json"

    def record(self, kind: str, key: str) -> Any:
        """The data recorded under ``kind``/``key``; None when there is none, the cache is off, or the
        record does not match its signature (then it is removed)."""
        path = self._record_path(kind, key)
        if path is None or not self._usable():
            return None
        if not (private(path.parent.parent, directory=True) and private(path.parent, directory=True)):
            return None
        assert self._secret is not None
        try:
            stored = json.loads(read_private(path))
            unsigned = {k: v for k, v in stored.items() if k != "hmac"}
            intact = (stored.get("format") == FORMAT and stored.get("kind") == kind and stored.get("key") == key
                      and signed_by(self._secret, unsigned, stored.get("hmac")))
        except OSError:  # missing, a link, or someone else's: never read, never removed
            return None
        except (ValueError, KeyError, TypeError, AttributeError):
            intact = False
        if not intact:
            if private(path, directory=False):
                path.unlink(missing_ok=True)
            return None
        return stored["data"]

    def save_record(self, kind: str, key: str, data: Any) -> None:
        """Record ``data`` (JSON) under ``kind``/``key``, atomically; a no-op when the cache is off."""
        path = self._record_path(kind, key)
        if path is None or not self._usable():
            return
        assert self.root is not None and self._secret is not None
        stored = {"format": FORMAT, "kind": kind, "key": key, "data": data}
        try:
            for folder in (self.root, self.root / RECORDS, path.parent):
                if folder != self.root and not private(folder.parent, directory=True):
                    return  # a planted link or someone else's folder: never created or written through
                private_dir(folder)
            if private(path.parent, directory=True):
                write_private(path, json.dumps({**stored, "hmac": sign(self._secret, stored)}, sort_keys=True))
        except OSError as e:
            self._cannot_write(e)

    def _cannot_write(self, error: OSError) -> None:
        if error.errno not in DEGRADE_ERRNOS:
            raise error
        self._turn_off(f"cannot be written ({error.strerror})")

    # ------------------------------------------------------------------------------------------
    # publishing

    def publish(self, key: str, model_path: Path, record: dict[str, Any]) -> None:
        """Store ``model_path`` (and its external data) with ``record`` under ``key``; atomic, race-safe.
        A cache that cannot be written is turned off with a warning; the caller's run goes on."""
        if not KEY.fullmatch(key) or not self._usable():
            return
        try:
            self._publish(key, model_path, record)
        except OSError as e:
            self._cannot_write(e)
            return
        except OnnxForgeError as e:  # save_model names its file; what matters is the errno underneath
            if not isinstance(e.__cause__, OSError):
                raise
            self._cannot_write(e.__cause__)
            return
        self._evict()

    def _publish(self, key: str, model_path: Path, record: dict[str, Any]) -> None:
        assert self.root is not None and self._secret is not None
        final = self._folder(key)
        for folder in (self.root, final.parent):
            private_dir(folder)
        if not private(final.parent, directory=True) or os.path.lexists(final):
            return
        tmp = Path(mkdtemp(prefix=".publish-", dir=final.parent))
        try:
            if _external_files(model_path):
                save_model(load_model(model_path, check=False), tmp / MODEL_NAME)
            else:
                shutil.copyfile(model_path, tmp / MODEL_NAME)
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
            for name in files:
                os.chmod(tmp / name, 0o600)
            # "written": when the entry was computed; a later run that restores it says so (a file's
            # mtime would not do: a hit touches entry.json for the LRU eviction)
            entry = {"format": FORMAT, "key": key, "files": files, "written": _utc_now(), **record}
            entry["hmac"] = sign(self._secret, entry)
            write_private(tmp / ENTRY_NAME, json.dumps(entry, indent=1, default=str) + "\n")
            try:
                os.rename(tmp, final)  # fails when another run published the key first: theirs is as good
            except OSError:
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


T = TypeVar("T")


def recorded(cache: StageCache | None, kind: str, key: str, measure: Callable[[], T], *,
             decode: Callable[[Any], T], encode: Callable[[T], Any]) -> tuple[T, bool]:
    """A measurement kept as a record: (the record under ``kind``/``key``, decoded; True) when ``cache``
    holds one, else (``measure()``; False), then recorded as ``encode`` spells it. ``key`` names all the
    measurement depends on (``stage_key`` of the model fingerprints, the feeds, the target, the code).
    A record ``decode`` refuses (KeyError, TypeError, ValueError: another shape) is measured again."""
    data = cache.record(kind, key) if cache is not None else None
    if data is not None:
        try:
            return decode(data), True
        except (KeyError, TypeError, ValueError):
            pass  # a record of another shape: measure again
    value = measure()
    if cache is not None:
        cache.save_record(kind, key, encode(value))
    return value, False
