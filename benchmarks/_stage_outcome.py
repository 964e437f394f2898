"""What one library stage did, for the real-model table: its exit code and result, its time to result
(wall and CPU seconds), and the words a table row gives them."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator

import onnxruntime as ort


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stage(fn, *args) -> tuple[int, dict]:
    """(exit code, result JSON) of a library stage: 0 with its result, 4 with the numbers it raised."""
    from onnxforge.errors import QualityGateError

    try:
        return 0, fn(*args).to_json()
    except QualityGateError as e:
        return 4, e.result or {}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def time_to_result() -> Iterator[list[float]]:
    """[wall seconds, CPU seconds of this process's threads and of the children it waited for (a user
    metric runs in one)] of the block, filled in when it ends."""
    took: list[float] = [0.0, 0.0]
    start, cpu = time.perf_counter(), _cpu_seconds()
    try:
        yield took
    finally:
        took[0] = time.perf_counter() - start
        took[1] = _cpu_seconds() - cpu


def speed(result: dict) -> str:
    """The kept (or best) model's measured speed vs the input, as the table writes it."""
    value = result.get("measured_speedup")
    if value is None and result.get("candidates"):
        chosen = next((c for c in result["candidates"] if c["scheme"] == result.get("chosen")), {})
        value = chosen.get("speedup_vs_fp32")
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.995 else f"{value:.2f}x (slower)"


def verdict(code: int, result: dict) -> str:
    """The exit code and what was kept, in a few words."""
    if code == 4:
        if result.get("tried"):
            return "exit 4: no try met the tolerance (input kept)"
        return f"exit 4: best kept ({result['chosen']})" if result.get("chosen") else "exit 4: best kept"
    if result.get("chosen"):
        nothing = next((n for n in result.get("notes", []) if n.startswith("nothing was quantized")), None)
        if nothing is None:
            return f"exit 0: kept {result['chosen']}"
        why = ": its layers are in If/Loop bodies" if "bodies" in nothing else ""
        return f"exit 0: kept {result['chosen']} (nothing quantized{why})"
    if "factored_layers" in result:
        ranks = sorted({info["rank"] for info in result["factored_layers"].values()})
        rank = f", rank {ranks[0]}" if len(ranks) == 1 else (f", ranks {ranks[0]}-{ranks[-1]}" if ranks else "")
        return f"exit 0: {len(result['factored_layers'])} layers factored{rank}"
    return f"exit 0: {result.get('ratio', 0):.0%} of channels removed"
