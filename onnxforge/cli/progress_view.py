"""How the CLI shows ``ProgressEvent``s (onnxforge.pipeline.progress), always on stderr.

On a terminal: a rich line with the stage and phase, a bar, i/N and the ETA. Piped (CI logs, ``| tee``):
plain timestamped lines, ``[21:04:05] quantize: calibrating 12/64 (ETA 0:41)``, rate-limited: nothing in
the first ``ONNXFORGE_PROGRESS_DELAY`` seconds (default 2: a command that fails fast on bad input
prints its one error line and nothing else), then a line on each phase change and at most one every
``interval`` seconds within a phase. The ETA is the phase's pace so far applied to what is left of it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.markup import escape

from onnxforge.cli.console import err
from onnxforge.errors import UsageError
from onnxforge.pipeline.progress import Progress, ProgressEvent

__all__ = ["DELAY_ENV", "Pace", "PlainLines", "RateLimiter", "format_eta", "progress_display"]

DELAY_ENV = "ONNXFORGE_PROGRESS_DELAY"
_DEFAULT_DELAY_S = 2.0
_INTERVAL_S = 10.0

Clock = Callable[[], float]


def format_eta(seconds: float) -> str:
    """``0:41``, ``12:05``, ``1:02:09``."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Pace:
    """Each phase's start (time and count); ``eta`` is the time its remaining items take at its pace so far."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._start: tuple[float, int] = (0.0, 0)

    def eta(self, event: ProgressEvent, now: float) -> float | None:
        key = (event.stage, event.phase)
        if key != self._key or (event.done is not None and event.done < self._start[1]):
            self._key, self._start = key, (now, event.done or 0)
        if event.done is None or not event.total:
            return None
        began, first = self._start
        if event.done <= first:
            return None
        return (now - began) / (event.done - first) * max(0, event.total - event.done)


class RateLimiter:
    """Whether a piped line is written now: not before ``delay`` seconds from the start, then on each
    phase change, and at most one every ``interval`` seconds within a phase."""

    def __init__(self, delay: float, interval: float = _INTERVAL_S, clock: Clock = time.monotonic) -> None:
        self.delay, self.interval, self.clock = delay, interval, clock
        self._started = clock()
        self._key: tuple[str, str] | None = None
        self._last = float("-inf")

    def admit(self, event: ProgressEvent) -> bool:
        now = self.clock()
        if now - self._started < self.delay:
            return False
        key = (event.stage, event.phase)
        if key == self._key and now - self._last < self.interval:
            return False
        self._key, self._last = key, now
        return True


class PlainLines:
    """Timestamped lines on ``stream`` for a reader that is not a terminal (see the module docstring)."""

    def __init__(self, stream: TextIO, limiter: RateLimiter, wall: Callable[[], str] | None = None) -> None:
        self.stream, self.limiter = stream, limiter
        self.pace = Pace()
        self.wall = wall or (lambda: time.strftime("%H:%M:%S"))

    def __call__(self, event: ProgressEvent) -> None:
        eta = self.pace.eta(event, self.limiter.clock())
        if not self.limiter.admit(event):
            return
        line = f"[{self.wall()}] {event.describe()}" + (f" (ETA {format_eta(eta)})" if eta is not None else "")
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # nobody reads our messages any more; keep going
            pass


def progress_delay() -> float:
    """Seconds before the first piped line: ``ONNXFORGE_PROGRESS_DELAY`` or 2."""
    raw = os.environ.get(DELAY_ENV)
    if raw is None or raw == "":
        return _DEFAULT_DELAY_S
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{DELAY_ENV}={raw!r} is not a number of seconds") from None
    return max(0.0, value)


@contextlib.contextmanager
def _bar(first: str, clock: Clock = time.monotonic) -> Iterator[Progress]:
    from rich.progress import BarColumn, TextColumn
    from rich.progress import Progress as Bar

    pace = Pace()
    with Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
             TextColumn("{task.fields[eta]}"), TextColumn("[dim]{task.fields[note]}"),
             console=err, transient=True) as bar:
        task = bar.add_task(escape(first), total=None, count="", eta="", note="")
        phase = ("", first)

        def update(event: ProgressEvent) -> None:
            nonlocal task, phase
            eta = pace.eta(event, clock())
            count = "" if event.done is None else f"{event.done}/{event.total}" if event.total else str(event.done)
            eta_text = f"ETA {format_eta(eta)}" if eta is not None else ""
            note = escape(event.message[:60])
            if phase != (event.stage, event.phase):  # a new phase, a new bar: rich keeps a total once set
                phase = (event.stage, event.phase)
                bar.remove_task(task)
                label = f"{event.stage}: {event.phase}" if event.stage else event.phase
                task = bar.add_task(escape(label), total=event.total or None, completed=event.done or 0,
                                    count=count, eta=eta_text, note=note)
            else:
                bar.update(task, total=event.total or None, completed=event.done or 0, count=count, eta=eta_text,
                           note=note)

        yield update


def progress_display(first: str) -> contextlib.AbstractContextManager[Progress]:
    """The progress callback a command hands to the pipeline: a bar on a terminal, timestamped lines
    when stderr is piped (``--json -`` keeps stdout for the JSON either way)."""
    if err.is_terminal:
        return _bar(first)
    import sys

    return contextlib.nullcontext(PlainLines(sys.stderr, RateLimiter(progress_delay())))
