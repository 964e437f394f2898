"""Where the CLI writes: rich consoles for stdout and stderr, ``--json`` output, and small formatters."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

__all__ = [
    "ReaderGone",
    "emit_json",
    "err",
    "format_score",
    "human_bytes",
    "out",
    "print_notes",
    "quiet",
    "speed_words",
]


class ReaderGone(BaseException):
    """Our stdout's reader went away (``| head``). Not an OSError: click and rich would each turn a
    BrokenPipeError into exit 1; main() stops quietly with 141."""


class _StdoutConsole(Console):
    def on_broken_pipe(self) -> None:
        raise ReaderGone


class _StderrConsole(Console):
    def on_broken_pipe(self) -> None:
        self.quiet = True  # nobody reads our messages any more; keep going, print nothing


# Piped output (CI logs, `| tee`) gets a width that fits the tables instead of rich's 80 columns.
out = _StdoutConsole(width=None if sys.stdout.isatty() else 160)
err = _StderrConsole(stderr=True, width=None if sys.stderr.isatty() else 160)


def quiet(json_path: str | None) -> bool:
    """``--json -`` owns stdout: nothing else is printed there."""
    return json_path == "-"


def emit_json(json_path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``--json PATH`` ('-' = stdout). PATH may not be a file the command read."""
    if not json_path:
        return
    text = json.dumps(payload, indent=2, default=str) + "\n"
    if json_path == "-":
        click.echo(text, nl=False)
        return
    from onnxforge._atomic import check_output_path, write_output_text

    ctx = click.get_current_context(silent=True)
    read = [v for v in (ctx.params.values() if ctx else ()) if isinstance(v, Path) and v.is_file()]
    sys.stdout.flush()  # a report to /dev/stdout comes after what was printed before it
    write_output_text(check_output_path(json_path, *read, stream_ok=True), text)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def print_notes(notes: list[str]) -> None:
    for note in notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")


def format_score(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f}%" if metric in ("accuracy", "agreement", "position-agreement") else f"{value:.4f}"


def speed_words(speedup: float | None, than: str = "fp32") -> str:
    """'1.70x faster than fp32', or '1.19x SLOWER than fp32' (never '0.84x faster')."""
    if speedup is None:
        return "speed not measured"
    if abs(speedup - 1.0) < 0.005:
        return f"the same speed as {than} (1.00x)"
    if speedup >= 1.0:
        return f"{speedup:.2f}x faster than {than}"
    return f"[yellow]{1 / speedup:.2f}x SLOWER than {than}[/]"
