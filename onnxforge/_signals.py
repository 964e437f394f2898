"""SIGTERM handled like Ctrl-C: it raises an exception, so temp files and half-written outputs
are removed on the way out (``finally`` blocks, context managers), and the CLI exits 143."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "sigterm_raises"]


class Terminated(BaseException):
    """The process received SIGTERM. A BaseException, like KeyboardInterrupt: ``except Exception`` lets it pass."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, the first SIGTERM raises Terminated; later ones are ignored while cleaning up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
