"""One progress model for every long step: stages, the runner's measuring table, the search, distillation.

A step reports ``ProgressEvent``s (a phase name, ``done``/``total`` when the count is known, a message)
through one callback, ``Progress``: the ``StageContext.progress`` a stage is given, the ``progress=`` of
``run_recipe``/``run_to_output``/``optimize``/``distill``. The runner names the stage an event comes
from (``for_stage``); a child process forwards its events as JSON lines (``to_json``/``from_json``).
Nothing here prints: the CLI's renderers (``onnxforge.cli.progress_view``) draw a bar on a terminal and
write timestamped, rate-limited lines when piped, and compute the ETA from the pace of ``done``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Progress", "ProgressEvent", "counted", "for_stage", "ignore", "step"]

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """Where a long step is: ``phase`` ("calibrating", "timing"), ``done`` of ``total`` when counted
    (``total`` None: not known), a free ``message`` (a trial's plan, the latest loss), and the
    ``stage`` it belongs to (set by the runner)."""

    phase: str
    done: int | None = None
    total: int | None = None
    message: str = ""
    stage: str = ""

    def describe(self) -> str:
        """``quantize: calibrating 12/64 (latest note)``: the line a renderer prints, without time or ETA."""
        text = f"{self.stage}: {self.phase}" if self.stage else self.phase
        if self.done is not None:
            text += f" {self.done}/{self.total}" if self.total else f" {self.done}"
        return text + (f" ({self.message})" if self.message else "")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProgressEvent:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


Progress = Callable[[ProgressEvent], None]


def ignore(event: ProgressEvent) -> None:
    """The progress of a caller that does not listen."""


def step(progress: Progress, phase: str, done: int | None = None, total: int | None = None,
         message: str = "") -> None:
    """Report one event: ``step(progress, "timing", 3, 30)``."""
    progress(ProgressEvent(phase, done, total, message))


def counted(progress: Progress, phase: str, items: Iterable[T], total: int | None = None) -> Iterator[T]:
    """``items`` passed through, reporting ``phase`` i/total as each one is taken (0/total first), and
    total/total once the last is done."""
    step(progress, phase, 0, total)
    done = 0
    for item in items:
        yield item
        done += 1
        step(progress, phase, done, total)


def for_stage(progress: Progress, stage: str) -> Progress:
    """``progress`` with ``stage`` set on every event that does not name one (a stage's own events)."""

    def tagged(event: ProgressEvent) -> None:
        progress(event if event.stage else dataclasses.replace(event, stage=stage))

    return tagged
