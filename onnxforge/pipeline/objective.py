"""What a stage or a search must improve on its input: one objective for quantize, prune and optimize.

- ``latency``: the fastest model within the quality gate, timed on the target interleaved with its
  input; a stage keeps it only when it is measured faster than the input (beyond the tie band), a
  prune try measured slower misses, and the search ranks its front by it.
- ``size``: the smallest file within the gate, kept only when smaller than the input; speed is
  reported only.

Otherwise the input is kept and the gate fails (issue 23: never worse than the input).
"""

from __future__ import annotations

import enum

__all__ = ["Objective"]


class Objective(enum.Enum):
    LATENCY = "latency"
    SIZE = "size"
