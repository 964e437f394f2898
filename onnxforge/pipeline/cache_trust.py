"""What lets the stage cache be trusted on a shared disk: a per-user secret that signs every entry,
record and setting, and file-system checks that never follow a link and never trust another user's
or a group-writable file.

Threat model: another local user, or any process with write access to the cache folder but not
to the key file, can neither make onnxforge serve an output it did not compute (a planted entry,
a replaced model with its sha256 updated beside it) nor make it read, copy or delete a file outside
the cache (a symlink planted as a shard, an entry or a file). Not protected: someone who can read
the key file or runs as you.

- The secret is 32 random bytes in ``$ONNXFORGE_CACHE_KEY_FILE``, else
  ``$XDG_CONFIG_HOME/onnxforge/cache.key``, else ``~/.config/onnxforge/cache.key``: outside the
  cache, created 0600, refused when another user owns it or others can read it.
- A signature is HMAC-SHA256 of canonical JSON (sorted keys, no whitespace) of what it covers.
- A folder or file is *private* when ``lstat`` says it is a real directory / regular file (not a
  link), owned by the current user and not writable by group or others (as ssh treats keys).
- The root may be a link (a path the user chose); it must be owned by the user, and writable by
  group or others only with the sticky bit (then nobody else can rename or delete what is ours).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "DEGRADE_ERRNOS",
    "key_file",
    "load_secret",
    "open_private",
    "private",
    "private_sha256",
    "read_private",
    "root_problem",
    "sign",
    "signed_by",
]

# errno values that mean "the cache cannot be written here": the run goes on without it
DEGRADE_ERRNOS = frozenset(getattr(errno, n) for n in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EFBIG")
                           if hasattr(errno, n))
_SECRET_BYTES = 32


def key_file() -> Path:
    """Where the per-user cache secret lives (never inside the cache)."""
    if os.environ.get("ONNXFORGE_CACHE_KEY_FILE"):
        return Path(os.environ["ONNXFORGE_CACHE_KEY_FILE"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "onnxforge" / "cache.key"


def load_secret(path: Path | None = None) -> bytes:
    """The secret in ``path`` (default ``key_file()``), created 0600 when missing.

    Raises OSError when it cannot be created, and PermissionError when it is not a private regular
    file of ours (a link, another owner, readable or writable by others) or not 32 bytes.
    """
    path = path or key_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = secrets.token_bytes(_SECRET_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # another run created it first: read theirs
            return load_secret(path)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        return secret
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PermissionError(errno.EPERM, "the cache key file is a symbolic link", str(path)) from e
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(errno.EPERM, "the cache key file must be a 0600 file of yours", str(path))
        secret = f.read(_SECRET_BYTES + 1)
    if len(secret) != _SECRET_BYTES:
        raise PermissionError(errno.EPERM, f"the cache key file must hold {_SECRET_BYTES} bytes", str(path))
    return secret


def sign(secret: bytes, payload: Any) -> str:
    """HMAC-SHA256 (hex) of ``payload`` as canonical JSON."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def signed_by(secret: bytes, payload: Any, signature: Any) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(secret, payload), signature)


def _private_stat(info: os.stat_result) -> bool:
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def private(path: Path, *, directory: bool) -> bool:
    """Whether ``path`` is a real directory (or regular file) of ours that nobody else can write."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    return kind(info.st_mode) and _private_stat(info)


def root_problem(root: Path) -> str | None:
    """Why the cache root cannot be trusted (None when it can, or does not exist yet)."""
    try:
        info = os.stat(root)  # the root itself may be a link the user chose
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != os.getuid():
        return f"is owned by another user (uid {info.st_uid})"
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        return "is writable by group or others without the sticky bit (chmod go-w it)"
    return None


def open_private(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a private regular file (never a link)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or not _private_stat(info):
        os.close(fd)
        raise PermissionError(errno.EPERM, "not a private regular file", str(path))
    return fd


def read_private(path: Path) -> bytes:
    with os.fdopen(open_private(path), "rb") as f:
        return f.read()


def private_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with os.fdopen(open_private(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
