"""SIGTERM handled like Ctrl-C: it raises an exception, so temp files and half-written outputs
are removed on the way out (``finally`` blocks, context managers), and the CLI exits 143.

A library onnxforge calls may install its own handlers (``ray.init`` sets SIGTERM to ``sys.exit``
and its core worker replaces the C-level handler): ``keep_signal_handlers`` puts the caller's back."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "keep_signal_handlers", "sigterm_raises"]


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


@contextlib.contextmanager
def keep_signal_handlers(*signums: int) -> Iterator[None]:
    """Restore the handlers of ``signums`` (default SIGTERM and SIGINT) as they were before the block.

    ``signal.signal`` re-installs the C-level handler too, so a handler a native extension put in
    place with ``sigaction`` is undone as well. Outside the main thread handlers cannot change: no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signums or (signal.SIGTERM, signal.SIGINT))}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # None: installed outside Python, cannot be put back from here
                signal.signal(signum, handler)
