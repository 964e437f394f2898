"""Work that runs the user's code (a ``file.py:callable`` source) runs in a child process.

The user's code may end its process (``sys.exit``, ``os._exit``, ``raise SystemExit``), hang, or
start a non-daemon thread that keeps the interpreter alive; run here, any of these would end or
block onnxforge with no report. ``run_in_child("module:function", args, kwargs, out=...)`` runs the
whole operation (an export: import, build, export, parity check; a distillation: import the teacher,
train, export, gate) in a fresh interpreter (``python -c``, in its own session), as
``function(*args, output=<staged>, **kwargs)``: it writes into a private staging folder beside the
output, and its stdout goes to our stderr so that ``--json -`` stays clean. Its progress messages
come back as lines on a pipe and reach the caller's ``progress`` in the caller's thread (so an
exception there, Ctrl-C included, stops the child). The parent waits at most ``timeout`` seconds,
checks that the staged file is a whole model, and renames it into place (data files first, the
model last). Any other end is a ModelSourceError (exit 2) saying how the process ended; nothing is
left behind: the staging folder, the child's temp folders and anything it left running in its
session are removed.

The child's result comes back as a pickle. It is the user's own code in the child that could
forge it, code that runs as the user already; the pickle grants it nothing more.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxforge._atomic import _fsync_dir, atomic_write_bytes, atomic_write_text, named_write_errors
from onnxforge.errors import ExportError, ModelSourceError, OnnxForgeError
from onnxforge.pipeline.progress import Progress, ProgressEvent

__all__ = ["SOURCE_TIMEOUT_S", "call_in_child", "child_main", "export_in_child", "run_in_child"]

SOURCE_TIMEOUT_S = 1800.0
_GRACE_S = 5.0  # between SIGTERM and SIGKILL: time to remove its temp files
_POLL_S = 0.1  # how often the wait looks at the child while relaying its progress
_REQUEST, _RESULT = "request.pickle", "result.pickle"
_CHILD = (
    "import sys; sys.path[0] = sys.argv[1]; "
    "from onnxforge.converters._isolation import child_main; child_main(sys.argv[2])"
)


class ChildTraceback(Exception):
    """The traceback of an unexpected error in the child process (shown with --debug)."""


def export_in_child(source: str | os.PathLike, out: Path, config: Any, *, timeout: float = SOURCE_TIMEOUT_S):
    """Run ``export(source, out, config)`` in a child process; returns its ExportResult with ``out`` as the path."""
    result = run_in_child("onnxforge.converters:export", (str(source),), {"config": config, "in_process": True},
                          out=out, source=source, task="export", timeout=timeout)
    _note_path(out).unlink(missing_ok=True)  # a stale note from an earlier failed export to this path
    return result


def run_in_child(
    function: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    out: Path,
    source: str | os.PathLike,
    task: str,
    timeout: float = SOURCE_TIMEOUT_S,
    timeout_option: str = "--timeout",
    progress: Progress | None = None,
) -> Any:
    """Call ``function`` ("package.module:name") as ``function(*args, output=<staged>, **kwargs)`` in a
    child process, and publish the model it saved at ``out``; returns its result, whose ``path`` is ``out``.

    ``out`` has been checked by the caller. For messages: ``source`` is the ``file.py:callable``
    whose code runs, ``task`` what the function does ("export"), ``timeout_option`` the setting that
    raises ``timeout``. With ``progress``, the function is also given ``progress=`` and its events
    are passed on (one JSON line each on the child's stdout pipe). Raises what the function raised
    (staged paths named as ``out``; a QualityGateError's kept model is published), or ModelSourceError
    when the process exited, was killed or ran past ``timeout`` seconds before reporting.
    """
    from onnxforge.converters.source import source_files

    for path in source_files(source):
        if not path.exists():  # no process to start for that
            raise ExportError(f"{path}: no such file")
    with named_write_errors(out):  # beside the output: the final rename stays on one file system
        staging = Path(tempfile.mkdtemp(prefix=".onnxforge-", dir=os.path.abspath(out.parent)))
    staged = staging / out.name
    work = None
    try:
        work = Path(tempfile.mkdtemp(prefix="onnxforge-child-"))  # request, result, the child's temp folders
        request = {"function": function, "args": tuple(args), "kwargs": dict(kwargs), "output": str(staged),
                   "progress": progress is not None, "cwd": os.getcwd(), "tempdir": str(work)}
        (work / _REQUEST).write_bytes(pickle.dumps(request))
        kind, value = _run_child(source, task, work, timeout, timeout_option, progress)
        if kind == "ok":
            _publish(staged, out, task)
            if hasattr(value, "path"):
                value.path = out
            return value
        if kind == "error":
            if getattr(value, "best_path", None) == str(staged) and staged.exists():  # a gate failed: the file is kept
                _publish(staged, out, task)
                value.best_path = str(out)
            value.message = value.message.replace(str(staged), str(out))
            raise value
        if kind == "exit":
            raise ModelSourceError(
                f"{source}: the model source exited with code {value} before the {task} finished",
                hint="the callable must return the model; it may not end the process",
            )
        name, text = value
        raise RuntimeError(f"{name} in the {task} process: {text}") from ChildTraceback(text)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def call_in_child(function: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, source: str | os.PathLike,
                  task: str, timeout: float = SOURCE_TIMEOUT_S, timeout_option: str = "--timeout") -> Any:
    """Call ``function`` ("package.module:name") as ``function(*args, **kwargs)`` in a child process and
    return what it returned: ``run_in_child`` for work that writes no model (a user metric's score).
    Raises what the function raised (an OnnxForgeError as it is), or ModelSourceError when the process
    exited, was killed or ran past ``timeout`` seconds."""
    work = Path(tempfile.mkdtemp(prefix="onnxforge-child-"))
    try:
        request = {"function": function, "args": tuple(args), "kwargs": dict(kwargs), "output": None,
                   "progress": False, "cwd": os.getcwd(), "tempdir": str(work)}
        (work / _REQUEST).write_bytes(pickle.dumps(request))
        kind, value = _run_child(source, task, work, timeout, timeout_option, None)
        if kind == "ok":
            return value
        if kind == "error":
            raise value
        if kind == "exit":
            raise ModelSourceError(f"{source}: the code exited with code {value} before the {task} finished",
                                   hint="it must return its value; it may not end the process")
        name, text = value
        raise RuntimeError(f"{name} in the {task} process: {text}") from ChildTraceback(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_child(source, task: str, work: Path, timeout: float, timeout_option: str,
               progress: Progress | None) -> tuple[str, Any]:
    import onnxforge

    root = str(Path(onnxforge.__file__).resolve().parents[1])  # the same onnxforge, whatever the cwd
    try:
        os.fstat(2)
        child_stderr = None  # ours: the child's prints go there too
    except OSError:
        child_stderr = subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, root, str(work)],
        stdin=subprocess.PIPE,  # never written: the child sees EOF when we are gone, and stops
        stdout=subprocess.PIPE,  # progress lines only: the child sends its own prints to stderr
        stderr=child_stderr,
        start_new_session=True,  # one process group to stop: the child and whatever it starts
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        _wait(process, timeout, lines, progress)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise ModelSourceError(
            f"{source}: the model source did not finish within {timeout:g} s",
            hint=f"raise {timeout_option} if the {task} needs longer; otherwise look for a hang in it",
        ) from None
    except BaseException:  # Ctrl-C, SIGTERM, an error in progress(): stop the child before cleaning up
        _stop(process)
        raise
    finally:
        _kill_group(process)
        if process.stdin is not None:  # always, as both were opened with PIPE
            process.stdin.close()
        reader.join(timeout=_GRACE_S)  # EOF once the group is gone
        if process.stdout is not None:
            process.stdout.close()
    _relay(lines, progress)  # what it said just before it ended
    result = work / _RESULT
    if not result.exists():
        code = process.returncode
        if code < 0:
            raise ModelSourceError(f"{source}: the {task} process was killed by {signal.Signals(-code).name}",
                                   hint=f"out of memory? the model source or the {task} crashed")
        return "exit", code
    return pickle.loads(result.read_bytes())


def _read_lines(stream, lines: queue.SimpleQueue) -> None:
    try:
        for raw in stream:
            lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
    except (OSError, ValueError):  # closed under us once the child is gone
        pass


def _relay(lines: queue.SimpleQueue, progress: Progress | None) -> None:
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            return
        if progress is not None:
            progress(_event(line))


def _event(line: str) -> ProgressEvent:
    """The event a child wrote as one JSON line (anything else on the pipe: a phase of its own)."""
    try:
        return ProgressEvent.from_json(json.loads(line))
    except (ValueError, TypeError, AttributeError):
        return ProgressEvent(line)


def _wait(process: subprocess.Popen, timeout: float, lines: queue.SimpleQueue, progress) -> None:
    """Until the child ends, passing its progress lines on in this thread; TimeoutExpired past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            process.wait(timeout=max(0.0, min(_POLL_S, deadline - time.monotonic())))
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
        _relay(lines, progress)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the child's group (it removes its temp files), SIGKILL after a grace period."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, getattr(signal, "SIGKILL", signal.SIGTERM))
        process.wait()


def _kill_group(process: subprocess.Popen) -> None:
    """Whatever the model source started and left running in the child's session."""
    _signal_group(process, getattr(signal, "SIGKILL", signal.SIGTERM))


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signum)
        elif process.poll() is None:  # no process groups (Windows): the child alone
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _note_path(out: Path) -> Path:
    return out.with_name(out.name + ".unverified.json")


def _publish(staged: Path, out: Path, task: str = "export") -> None:
    """Check the staged model reads as ONNX with all its data files, then rename its files beside
    ``out``: data files and the note first, the model last, so a reader never sees a model
    without its data."""
    try:
        header = onnx.load(str(staged), load_external_data=False)
    except Exception as e:
        raise ExportError(f"the {task} process reported {out} but left no readable model ({type(e).__name__})") from e
    from onnxforge.model_io import _external_data_files

    missing = [n for n in _external_data_files(header) if not (staged.parent / n).is_file()]
    if missing or not header.HasField("graph"):
        raise ExportError(
            f"the {task} process reported {out} but left it incomplete ({missing[0] if missing else 'no graph'})"
        )
    note = _note_path(staged)
    if note.exists():  # written by the child with the staged paths
        data = json.loads(note.read_text())
        data.update(path=str(out), unverified_note=str(_note_path(out)))
        atomic_write_text(note, json.dumps(data, indent=2) + "\n")
    with named_write_errors(out):
        for produced in sorted(staged.parent.iterdir(), key=lambda p: p == staged):
            os.replace(produced, out.parent / produced.name)
        _fsync_dir(out.parent)


# ----------------------------------------------------------------------------------------------
# The child


def _exit_with_parent() -> None:
    """Stop (through SIGTERM, so temp files go) once stdin reaches EOF: the parent is gone."""
    try:
        sys.stdin.buffer.read()
    except Exception:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def child_main(work: str) -> None:
    from onnxforge._signals import Terminated, sigterm_raises

    folder = Path(work)
    request = pickle.loads((folder / _REQUEST).read_bytes())
    os.chdir(request["cwd"])
    tempfile.tempdir = request["tempdir"]
    os.environ["TMPDIR"] = request["tempdir"]
    say = _progress_to_parent()
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    with sigterm_raises():
        try:
            module, _, name = request["function"].partition(":")
            function = getattr(importlib.import_module(module), name)
            kwargs = {
                **request["kwargs"],
                **({"output": request["output"]} if request["output"] is not None else {}),
                **({"progress": say} if request["progress"] else {}),
            }
            payload: tuple[str, Any] = ("ok", function(*request["args"], **kwargs))
        except OnnxForgeError as e:
            payload = ("error", e)
        except SystemExit as e:  # the model source called sys.exit() or raised SystemExit
            payload = ("exit", e.code if isinstance(e.code, int) else 0 if e.code is None else f"1 ({e.code})")
        except (KeyboardInterrupt, Terminated):
            _flush()
            os._exit(143)
        except BaseException as e:  # a bug: the parent reports it as an internal error
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            payload = ("crash", (type(e).__name__, f"{first}\n{traceback.format_exc()}"))
        try:
            data = pickle.dumps(payload)
        except Exception as e:
            data = pickle.dumps(("crash", (type(e).__name__, f"the result could not be sent back: {e}")))
        atomic_write_bytes(folder / _RESULT, data)
    _flush()
    os._exit(0)  # not sys.exit: a non-daemon thread the model source started must not keep us alive


def _progress_to_parent() -> Progress:
    """Keep stdout (the pipe to the parent) for progress events, one JSON line each, and point fd 1 at
    stderr, so that what the model source prints, from Python or native code, goes to the parent's stderr."""
    pipe = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="replace", buffering=1)
    os.dup2(2, 1)
    if isinstance(sys.stdout, io.TextIOWrapper):  # always in the child: typed TextIO, which lacks reconfigure
        sys.stdout.reconfigure(line_buffering=True)

    def say(event: ProgressEvent) -> None:
        try:
            pipe.write(json.dumps(event.to_json()) + "\n")
        except (OSError, ValueError):  # the parent is gone: the stdin watcher stops us
            pass

    return say


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
