"""onnxruntime's own log lines, shown with ``--debug`` only.

onnxruntime prints colored lines of its own on stderr (``[E:onnxruntime:, inference_session.cc:…]
Exception during initialization: …`` and a color reset) when a session fails; the exception it
raises carries the same text, which onnxforge reports as its one ``error:`` line. So every session
onnxforge creates logs fatal messages only, and the CLI sets onnxruntime's default logger the same
way (it covers the sessions libraries create for us: onnxruntime's calibrators, onnxsim), unless
``--debug`` asks for onnxruntime's own default (warnings and errors).
"""

from __future__ import annotations

import onnxruntime as ort

__all__ = ["QUIET", "VERBOSE", "session_options", "set_ort_logging"]

QUIET = 4  # onnxruntime's FATAL: nothing for a failure that raises (its message is in the exception)
VERBOSE = 2  # onnxruntime's own default, WARNING: what --debug shows

_severity = QUIET


def set_ort_logging(debug: bool) -> None:
    """Quiet onnxruntime (the CLI, without ``--debug``), or let it log as it would by default."""
    global _severity
    _severity = VERBOSE if debug else QUIET
    ort.set_default_logger_severity(_severity)


def session_options() -> ort.SessionOptions:
    """Fresh SessionOptions that log as ``set_ort_logging`` said (quiet unless ``--debug``)."""
    options = ort.SessionOptions()
    options.log_severity_level = _severity
    return options
