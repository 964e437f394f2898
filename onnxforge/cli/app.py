"""The ``onnxforge`` command group and its entry point: errors print one line and a hint, never a traceback
unless ``--debug``; the exit code says what kind of failure it was (see onnxforge.errors)."""

from __future__ import annotations

import contextlib
import os
import sys

import click
from rich.markup import escape

from onnxforge.cli.console import ReaderGone, err
from onnxforge.errors import OnnxForgeError

__all__ = ["cli", "entry", "main"]


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            raise ReaderGone from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="show tracebacks (also accepted after the subcommand)")
@click.version_option(package_name="onnxforge")
def cli(debug: bool) -> None:
    """Export, simplify, quantize, prune and profile ONNX models for deployment.

    Every stage command is a one-stage recipe: it runs through the same registry, cache and quality gates as
    'onnxforge run', and --save-recipe writes the recipe that reruns it."""


def _print_error(error: OnnxForgeError) -> None:
    # Messages carry user text and pip extras like onnxforge[gpu]: escape them, or rich eats [..].
    # emoji=False: "model.py:three:" is a path, not the :three: emoji
    err.print(f"[bold red]error:[/] {escape(error.message)}", highlight=False, soft_wrap=True, emoji=False)
    if error.hint:
        err.print(f"[dim]hint:[/] {escape(error.hint)}", highlight=False, soft_wrap=True, emoji=False)


def main(argv: list[str] | None = None, *, pass_on_sigterm: bool = True) -> int:
    """Run the command line in this process; returns the exit code.

    A SIGTERM unwinds the command like Ctrl-C (no partial output) and returns 143; with
    ``pass_on_sigterm`` (the default, for callers that run the CLI inside their own process, pytest
    among them) the signal is then raised again for the handler that was there before, so the caller
    stops too instead of carrying on as if the command had merely failed."""
    import signal

    from onnxforge._scratch import scratch_folder
    from onnxforge._signals import sigterm_raises

    with sigterm_raises(), scratch_folder():  # SIGTERM unwinds like Ctrl-C; temp folders in one place
        code = _main(argv)
    if code == 143 and pass_on_sigterm:
        signal.raise_signal(signal.SIGTERM)
    return code


def _main(argv: list[str] | None) -> int:
    from onnxforge._ort_logs import set_ort_logging
    from onnxforge._signals import Terminated

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ONNXFORGE_DEBUG") == "1"
    if "--debug" in argv[1:]:  # `onnxforge quantize ... --debug`: the group's flag, wherever it is written
        argv = ["--debug", *[a for a in argv if a != "--debug"]]
    set_ort_logging(debug)  # onnxruntime's own log lines would double our one error line
    try:
        cli.main(args=argv, prog_name="onnxforge", standalone_mode=False)
        sys.stdout.flush()  # a reader that left shows here, not as a message at interpreter exit
        code = 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:  # usage errors from option parsing
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False, soft_wrap=True)
        err.print("[dim]hint:[/] see 'onnxforge --help' or 'onnxforge COMMAND --help'", highlight=False)
        code = 2
    except click.exceptions.Abort:
        err.print("[bold red]interrupted[/]")
        code = 130
    except OnnxForgeError as e:
        if debug:
            raise
        _print_error(e)
        code = e.exit_code
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: no partial output was written")
        code = 130
    except Terminated:
        err.print("[bold red]terminated[/]: no partial output was written")
        code = 143
    except (ReaderGone, BrokenPipeError):  # `onnxforge inspect m.onnx | head -n 1`: stop quietly
        _mute_stdout()
        code = 141
    except OSError as e:
        from onnxforge._atomic import WRITE_ERRNOS, os_error

        if debug:
            raise
        if e.errno in WRITE_ERRNOS:  # e.g. a library's temp file in a full $TMPDIR: the path and the reason
            _print_error(os_error(e))
            code = 2
        else:
            _print_internal_error(e)
            code = 1
    except Exception as e:  # a bug in onnxforge: one line, unless --debug
        if debug:
            raise
        _print_internal_error(e)
        code = 1
    return code


def _print_internal_error(e: Exception) -> None:
    from onnxforge.errors import first_line

    first = first_line(e) if str(e).strip() else ""
    err.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(first)}", highlight=False, soft_wrap=True)
    err.print("[dim]hint:[/] re-run with --debug for the traceback, and please report it", highlight=False)


def _mute_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's last flush of stdout cannot fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def entry() -> None:
    sys.exit(main(pass_on_sigterm=False))  # the process ends with 143 either way
