"""The errors onnxforge raises on purpose, each with the exit code the CLI returns for it.

Exit codes: 2 bad input or usage (an output that cannot be written included: no space, read-only,
permission denied, name too long), 3 target unavailable, 4 quality gate not met (the best model
found is still saved), 130 interrupted (SIGINT), 143 terminated (SIGTERM), 141 the reader of our
output went away (EPIPE, ``| head``), 1 anything else (a bug in onnxforge: please report it).
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CalibrationDataError",
    "ExportError",
    "InvalidModelError",
    "MergeError",
    "ModelSourceError",
    "OnnxForgeError",
    "OutputPathError",
    "QualityGateError",
    "RecipeError",
    "TargetUnavailableError",
    "UsageError",
    "first_line",
]

import re
from typing import Any

_LOAD_FROM = re.compile(r"Load model from \S+ failed:\s*")
_ORT_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
# "/onnxruntime_src/.../upsamplebase.h:370 onnxruntime::UpsampleMode onnxruntime::UpsampleBase::
# StringToUpsampleMode(const std::string&) " before the reason: where in onnxruntime's C++ it was raised
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ (?:[\w:<>*&]+ )?[\w:<>~]+\([^()]*\)\s*")


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message, at most ``limit`` characters, cut at a word boundary
    (with an ellipsis), never mid-word; onnxruntime's "[ONNXRuntimeError] : 1 : FAIL :" status, its
    "Load model from <temp path> failed:" and the C++ source location and function it names are
    dropped, so the reason comes first (the file is named by the caller)."""
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else (type(error).__name__ if isinstance(error, BaseException) else "")
    line = _ORT_SOURCE.sub("", _LOAD_FROM.sub("", _ORT_STATUS.sub("", line)))
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit - 2)
    return line[: cut if cut > limit // 2 else limit - 2].rstrip(" ,:;") + " …"


class OnnxForgeError(Exception):
    """Base class. ``hint`` is a short suggestion printed after the message."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):
        # Errors cross process boundaries (an export runs user code in a child process); the
        # default reduce would rebuild from args alone and lose the hint and best_path.
        return _rebuild, (type(self), dict(self.__dict__))


def _rebuild(cls: type[OnnxForgeError], state: dict[str, Any]) -> OnnxForgeError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class UsageError(OnnxForgeError):
    """Arguments that do not make sense together, or malformed option values."""

    exit_code = 2


class InvalidModelError(UsageError):
    """The model file is missing, unreadable, not ONNX, or fails the checker."""


class ExportError(UsageError):
    """The source model could not be loaded or exported to ONNX."""


class ModelSourceError(ExportError):
    """The model source's own code (file.py:callable) ended its process, or ran past --timeout."""


class CalibrationDataError(UsageError):
    """Calibration or evaluation data that does not fit the model."""


class RecipeError(UsageError):
    """A pipeline recipe with unknown keys, wrong types or missing files."""


class OutputPathError(UsageError):
    """An output path that cannot be written, or that would overwrite the input."""


class CacheError(UsageError):
    """The stage cache cannot be used or written (for a command about the cache itself; a run goes on
    without it)."""


class MergeError(UsageError):
    """Models or options that cannot be merged into one graph (ensemble members whose inputs differ,
    a post-processing block that does not fit the model's output, a tokenizer without a vocabulary)."""


class TargetUnavailableError(OnnxForgeError):
    """The requested execution target is not usable on this machine."""

    exit_code = 3


class QualityGateError(OnnxForgeError):
    """A stage could not meet its accuracy tolerance. ``best_path`` holds the best model found and
    ``result`` the stage's result as JSON (every try with its numbers), so that exit 4 still shows
    the table and writes ``--json``."""

    exit_code = 4

    def __init__(
        self, message: str, *, hint: str | None = None, best_path: str | None = None, result: dict | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.best_path = best_path
        self.result = result
