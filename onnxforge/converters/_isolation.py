"""Exports of ``file.py:callable`` sources run in a child process.

The user's code may end its process (``sys.exit``, ``os._exit``, ``raise SystemExit``), hang, or
start a non-daemon thread that keeps the interpreter alive; run here, any of these would end or
block onnxforge with no report. The child (a fresh interpreter, ``python -c``, in its own session)
runs the whole export — import, build, export, parity check — writing into a private staging
folder beside the output, with its stdout sent to our stderr so that ``--json -`` stays clean.
The parent waits at most ``timeout`` seconds, checks that the staged file is the model the child
describes, and renames it into place (data files first, the model last). Any other end is a
ModelSourceError (exit 2) saying how the process ended; nothing is left behind: the staging
folder, the child's temp folders and anything it left running in its session are removed.

The child's result comes back as a pickle. It is the user's own code in the child that could
forge it, code that runs as the user already; the pickle grants it nothing more.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

import onnx

from onnxforge._atomic import _fsync_dir, atomic_write_bytes, atomic_write_text, named_write_errors
from onnxforge.errors import ExportError, ModelSourceError, OnnxForgeError

__all__ = ["SOURCE_TIMEOUT_S", "export_in_child", "child_main"]

SOURCE_TIMEOUT_S = 1800.0
_GRACE_S = 5.0  # between SIGTERM and SIGKILL: time to remove its temp files
_REQUEST, _RESULT = "request.pickle", "result.pickle"
_CHILD = "import sys; sys.path[0] = sys.argv[1]; from onnxforge.converters._isolation import child_main; child_main(sys.argv[2])"


class ChildTraceback(Exception):
    """The traceback of an unexpected error in the export process (shown with --debug)."""


def export_in_child(source: str | os.PathLike, out: Path, config: Any, *, timeout: float = SOURCE_TIMEOUT_S):
    """Run ``export(source, out, config)`` in a child process; returns its ExportResult with ``out`` as the path.

    ``out`` has been checked by the caller. Raises what the export raised, or ModelSourceError when
    the process exited, was killed or ran past ``timeout`` seconds before reporting.
    """
    with named_write_errors(out):  # beside the output: the final rename stays on one file system
        staging = Path(tempfile.mkdtemp(prefix=".onnxforge-", dir=os.path.abspath(out.parent)))
    staged = staging / out.name
    work = None
    try:
        work = Path(tempfile.mkdtemp(prefix="onnxforge-export-"))  # request, result, the child's temp folders
        request = {"source": str(source), "output": str(staged), "config": config, "cwd": os.getcwd(), "tempdir": str(work)}
        (work / _REQUEST).write_bytes(pickle.dumps(request))
        kind, value = _run_child(source, work, timeout)
        if kind == "ok":
            _publish(staged, out)
            _note_path(out).unlink(missing_ok=True)  # a stale note from an earlier failed export to this path
            value.path = out
            return value
        if kind == "error":
            if getattr(value, "best_path", None) == str(staged) and staged.exists():  # parity failed: the file is kept
                _publish(staged, out)
                value.best_path = str(out)
            value.message = value.message.replace(str(staged), str(out))
            raise value
        if kind == "exit":
            raise ModelSourceError(
                f"{source}: the model source exited with code {value} before the export finished",
                hint="the callable must return the model; it may not end the process",
            )
        name, text = value
        raise RuntimeError(f"{name} in the export process: {text}") from ChildTraceback(text)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _run_child(source, work: Path, timeout: float) -> tuple[str, Any]:
    import onnxforge

    root = str(Path(onnxforge.__file__).resolve().parents[1])  # the same onnxforge, whatever the cwd
    try:
        os.fstat(2)
        child_stdout: int = 2  # its prints go to our stderr
    except OSError:
        child_stdout = subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, root, str(work)],
        stdin=subprocess.PIPE,  # never written: the child sees EOF when we are gone, and stops
        stdout=child_stdout,
        start_new_session=True,  # one process group to stop: the child and whatever it starts
    )
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise ModelSourceError(
            f"{source}: the model source did not finish within {timeout:g} s",
            hint="raise --timeout if loading and exporting it takes longer; otherwise look for a hang in it",
        ) from None
    except BaseException:  # Ctrl-C, SIGTERM: stop the child before cleaning up
        _stop(process)
        raise
    finally:
        _kill_group(process)
        process.stdin.close()
    result = work / _RESULT
    if not result.exists():
        code = process.returncode
        if code < 0:
            raise ModelSourceError(f"{source}: the export process was killed by {signal.Signals(-code).name}",
                                   hint="out of memory? the model source or the exporter crashed")
        return "exit", code
    return pickle.loads(result.read_bytes())


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


def _publish(staged: Path, out: Path) -> None:
    """Check the staged model reads as ONNX with all its data files, then rename its files beside
    ``out``: data files and the note first, the model last, so a reader never sees a model
    without its data."""
    try:
        header = onnx.load(str(staged), load_external_data=False)
    except Exception as e:
        raise ExportError(f"the export process reported {out} but left no readable model ({type(e).__name__})") from e
    from onnxforge.model_io import _external_data_files

    missing = [n for n in _external_data_files(header) if not (staged.parent / n).is_file()]
    if missing or not header.HasField("graph"):
        raise ExportError(f"the export process reported {out} but left it incomplete ({missing[0] if missing else 'no graph'})")
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
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    with sigterm_raises():
        try:
            from onnxforge.converters import export

            payload: tuple[str, Any] = ("ok", export(request["source"], request["output"], request["config"], in_process=True))
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
            data = pickle.dumps(("crash", (type(e).__name__, f"the export result could not be sent back: {e}")))
        atomic_write_bytes(folder / _RESULT, data)
    _flush()
    os._exit(0)  # not sys.exit: a non-daemon thread the model source started must not keep us alive


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
