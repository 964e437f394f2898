"""The progress model (onnxforge.pipeline.progress) and its piped renderer (onnxforge.cli.progress_view):
events, the stage tag, the child-process wire form, the rate limiter and the ETA on a fake clock."""

from __future__ import annotations

import io
import json

import pytest

from onnxforge.cli.progress_view import DELAY_ENV, Pace, PlainLines, RateLimiter, format_eta, progress_delay
from onnxforge.errors import UsageError
from onnxforge.pipeline.progress import ProgressEvent, counted, for_stage


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_event_reads_as_the_line_a_person_sees():
    assert ProgressEvent("calibrating", 12, 64, stage="quantize").describe() == "quantize: calibrating 12/64"
    assert ProgressEvent("epoch", 3, 25, "loss 0.1").describe() == "epoch 3/25 (loss 0.1)"
    assert ProgressEvent("rows", 7).describe() == "rows 7"  # a count without a known total
    assert ProgressEvent("preparing").describe() == "preparing"


def test_an_event_survives_the_child_process_wire_form():
    event = ProgressEvent("epoch", 2, 5, "loss 0.25", stage="distill")
    assert ProgressEvent.from_json(event.to_json()) == event
    assert ProgressEvent.from_json({"phase": "x", "unknown": 1}) == ProgressEvent("x")


def test_counted_reports_each_item_and_the_stage_tag_is_added_once():
    seen: list[ProgressEvent] = []
    tagged = for_stage(seen.append, "prune_channels")
    assert list(counted(tagged, "groups scored", "abc", 3)) == ["a", "b", "c"]
    assert [(e.done, e.total) for e in seen] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert {e.stage for e in seen} == {"prune_channels"}
    tagged(ProgressEvent("running", stage="other"))  # an event that names its stage keeps it
    assert seen[-1].stage == "other"


def test_the_rate_limiter_waits_then_prints_phase_changes_and_one_line_per_interval():
    clock = FakeClock()
    limiter = RateLimiter(delay=2.0, interval=10.0, clock=clock)
    calibrating = ProgressEvent("calibrating", 1, 64, stage="quantize")
    assert not limiter.admit(calibrating)  # inside the start delay: a fast failure prints only its error
    clock.now += 1.9
    assert not limiter.admit(calibrating)
    clock.now += 0.2
    assert limiter.admit(calibrating)  # past the delay: the first line
    clock.now += 5
    assert not limiter.admit(calibrating)  # the same phase, inside the interval
    assert limiter.admit(ProgressEvent("timing", 0, 20, stage="quantize"))  # a phase change: at once
    clock.now += 9.9
    assert not limiter.admit(ProgressEvent("timing", 10, 20, stage="quantize"))
    clock.now += 0.1
    assert limiter.admit(ProgressEvent("timing", 15, 20, stage="quantize"))  # 10 s on: one more
    assert limiter.admit(ProgressEvent("timing", 15, 20, stage="prune"))  # another stage's phase is a change


def test_the_eta_is_the_phases_pace_applied_to_what_is_left():
    pace = Pace()
    assert pace.eta(ProgressEvent("calibrating", 0, 64), 0.0) is None  # no pace yet
    assert pace.eta(ProgressEvent("calibrating", 16, 64), 8.0) == pytest.approx(24.0)  # 0.5 s a batch, 48 left
    assert pace.eta(ProgressEvent("timing", 0, 10), 9.0) is None  # a new phase starts its own pace
    assert pace.eta(ProgressEvent("timing", 5, 10), 19.0) == pytest.approx(10.0)
    assert pace.eta(ProgressEvent("preparing"), 20.0) is None  # uncounted: no ETA
    assert format_eta(41) == "0:41" and format_eta(725) == "12:05" and format_eta(3729) == "1:02:09"


def test_plain_lines_are_timestamped_with_the_count_and_eta_and_rate_limited():
    clock = FakeClock()
    stream = io.StringIO()
    lines = PlainLines(stream, RateLimiter(delay=0.0, interval=10.0, clock=clock), wall=lambda: "21:04:05")
    for done in range(0, 65):
        lines(ProgressEvent("calibrating", done, 64, stage="quantize"))
        clock.now += 0.5
    lines(ProgressEvent("timing", 0, 20, stage="quantize"))
    printed = stream.getvalue().splitlines()
    assert printed[0] == "[21:04:05] quantize: calibrating 0/64"
    assert printed[1] == "[21:04:05] quantize: calibrating 20/64 (ETA 0:22)"  # 10 s later, 0.5 s a batch
    assert printed[-1] == "[21:04:05] quantize: timing 0/20"
    assert len(printed) == 5  # 32 s of calibrating: at 0, 10, 20 and 30 s; then the phase change


def test_the_delay_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(DELAY_ENV, raising=False)
    assert progress_delay() == 2.0
    monkeypatch.setenv(DELAY_ENV, "0")
    assert progress_delay() == 0.0
    monkeypatch.setenv(DELAY_ENV, "soon")
    with pytest.raises(UsageError, match=DELAY_ENV):
        progress_delay()


def test_on_a_terminal_the_bar_shows_the_stage_phase_count_and_eta(monkeypatch):
    from rich.console import Console

    from onnxforge.cli import progress_view

    screen = io.StringIO()
    monkeypatch.setattr(progress_view, "err", Console(file=screen, force_terminal=True, width=120))
    times = iter([0.0, 0.0, 8.0])
    with progress_view._bar("starting", clock=lambda: next(times)) as update:
        update(ProgressEvent("preparing", stage="quantize"))  # uncounted: no total
        update(ProgressEvent("calibrating", 0, 64, stage="quantize"))
        update(ProgressEvent("calibrating", 16, 64, stage="quantize", message="minmax"))
    shown = screen.getvalue()
    assert "quantize: calibrating" in shown and "16/64" in shown and "ETA 0:24" in shown, shown
    assert "minmax" in shown


def test_the_parent_reads_a_childs_event_lines():
    from onnxforge.converters._isolation import _event

    event = ProgressEvent("epoch", 3, 25, "loss 0.1000")
    assert _event(json.dumps(event.to_json())) == event
    assert _event("a line that is not JSON") == ProgressEvent("a line that is not JSON")
    assert _event("[1, 2]") == ProgressEvent("[1, 2]")
