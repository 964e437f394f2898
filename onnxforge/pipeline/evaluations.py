"""What this process has already measured, so that nothing is measured twice.

- **Fingerprints.** A file's sha256 is computed once per process while its (size, mtime, inode) stay
  the same: a search's hundred trials, each with several stages, hash their data file once. A model
  given as bytes or a ModelProto is hashed by its serialized bytes; samples in memory (held-out
  calibration samples) by their arrays, once per SampleSet object; a set of feeds by its arrays.
- **Evaluations** (Olive caches evaluations the same way): a model's outputs on a data set are kept
  under (model fingerprint, data fingerprint, sample limit, target) and a candidate's score under
  (candidate, reference, data, metric, limit, target), so the same model on the same data runs once
  per process. Outputs are large: only the last ``MAX_OUTPUTS`` sets are kept (a reference's, which is
  what is asked for again); scores are floats and all are kept.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

__all__ = [
    "cached_outputs",
    "cached_score",
    "clear_evaluations",
    "feeds_fingerprint",
    "file_fingerprint",
    "model_fingerprint",
    "samples_fingerprint",
]

MAX_OUTPUTS = 4

_FILES: dict[str, tuple[tuple, str]] = {}
_SAMPLES: dict[int, tuple[weakref.ref, str]] = {}
_OUTPUTS: OrderedDict[tuple, list[np.ndarray]] = OrderedDict()
_SCORES: dict[tuple, Any] = {}  # scores, and the gate verdicts they come with
T = TypeVar("T")


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file (or a folder's files: model_io.content_sha256), computed once per process
    while the file's (every file's, for a folder) size, modification time and inode are unchanged."""
    from onnxforge.model_io import content_sha256

    resolved = Path(path).resolve()
    files = sorted(p for p in resolved.rglob("*") if p.is_file()) if resolved.is_dir() else [resolved]
    state = tuple((str(f), *_stat(f)) for f in files)
    known = _FILES.get(str(resolved))
    if known is not None and known[0] == state:
        return known[1]
    digest = content_sha256(resolved)
    _FILES[str(resolved)] = (state, digest)
    return digest


def _stat(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def model_fingerprint(model: str | os.PathLike | bytes | onnx.ModelProto) -> str:
    """A model's fingerprint: its file's (with external data: ``<name>.data`` beside it), else its bytes'."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    if isinstance(model, bytes):
        return hashlib.sha256(model).hexdigest()
    path = Path(model)
    data = path.with_name(path.name + ".data")
    return file_fingerprint(path) + (":" + file_fingerprint(data) if data.exists() else "")


def feeds_fingerprint(feeds: Mapping[str, np.ndarray]) -> str:
    """Fingerprint of one set of feeds (input name -> array): names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(feeds):
        value = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def samples_fingerprint(samples: Any) -> str:
    """Fingerprint of samples in memory (a SampleSet): their arrays and labels, hashed once per object."""
    known = _SAMPLES.get(id(samples))
    if known is not None and known[0]() is samples:
        return known[1]
    digest = hashlib.sha256()
    arrays = dict(samples.inputs)
    if samples.labels is not None:
        arrays["\0label"] = samples.labels
    for name in sorted(arrays):
        value = arrays[name]
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
        if value.dtype == object:  # ragged: one array per sample
            for row in value:
                row = np.ascontiguousarray(row)
                digest.update(f"{row.dtype}:{row.shape}".encode() + row.tobytes())
        else:
            digest.update(np.ascontiguousarray(value).tobytes())
    _SAMPLES[id(samples)] = (weakref.ref(samples), digest.hexdigest())
    return _SAMPLES[id(samples)][1]


def cached_outputs(key: tuple, compute: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
    """The outputs stored under ``key``, else ``compute()`` (then stored; the oldest set is dropped)."""
    if key in _OUTPUTS:
        _OUTPUTS.move_to_end(key)
        return _OUTPUTS[key]
    outputs = compute()
    _OUTPUTS[key] = outputs
    while len(_OUTPUTS) > MAX_OUTPUTS:
        _OUTPUTS.popitem(last=False)
    return outputs


def cached_score(key: tuple, compute: Callable[[], T]) -> T:
    """The score (or verdict) stored under ``key``, else ``compute()`` (then stored)."""
    if key not in _SCORES:
        _SCORES[key] = compute()
    return _SCORES[key]


def clear_evaluations() -> None:
    """Forget every fingerprint and evaluation (tests; a long-lived process that wants the memory back)."""
    _FILES.clear()
    _SAMPLES.clear()
    _OUTPUTS.clear()
    _SCORES.clear()
