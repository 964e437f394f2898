"""Silencing output that libraries write below Python, straight to file descriptors 1 and 2.

The TorchScript exporter dumps its whole graph to C++ stdout when it fails (its
``setup_onnx_logging`` tests a function object for truth, so its logging is always on). That
would corrupt ``--json -`` and bury our one-line error; Keras's torch backend goes through the
same exporter.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["silent_fds"]


@contextlib.contextmanager
def silent_fds() -> Iterator[None]:
    """Point file descriptors 1 and 2 at a temp file for the block; our own error says what failed."""
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is None:  # no console (pythonw, some daemons)
            continue
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {}
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                try:
                    saved[fd] = os.dup(fd)
                except OSError:
                    continue
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
