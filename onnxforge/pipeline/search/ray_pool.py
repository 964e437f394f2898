"""Trials as Ray tasks: builds and scoring run anywhere; a timing holds a whole node.

Each trial is two chained tasks. The build task (1 CPU) runs the chain through the stage cache and
scores it on the eval data; its model travels back through Ray's object store. The timing task asks
for as many CPUs as the smallest node has, so it runs alone on a node (no other trial's build or
timing shares its cores), and it times the model interleaved with the input model on that same node:
it reports a ratio, which compares across nodes where absolute times would not.

Data files (calibration, eval) and the stage cache are read by path: on a multi-node cluster they
must sit on a path every node sees (a shared file system); the models themselves travel through the
object store. ``address="local"`` starts a private local Ray instance and stops it on ``close()``.
Connecting leaves the process's SIGTERM/SIGINT handlers as they were: ``ray.init`` replaces them, and
a library must not take a user's (or pytest's) signals.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from onnxforge._signals import keep_signal_handlers
from onnxforge.errors import TargetUnavailableError, UsageError
from onnxforge.pipeline.search.space import TrialPlan
from onnxforge.pipeline.search.timing import median_timing
from onnxforge.pipeline.search.trial import TrialContext, evaluate_plan, trial_timer

__all__ = ["RayPool"]


def _build(number: int, plan: TrialPlan, ctx: TrialContext) -> tuple[dict[str, Any], bytes | None]:
    with tempfile.TemporaryDirectory(prefix="onnxforge-ray-") as tmp:
        keep = Path(tmp) / "model.onnx"
        record = evaluate_plan(number, plan, ctx, keep, timing=False)
        data = keep.read_bytes() if record["status"] == "ok" else None
    record.pop("path", None)
    return record, data


def _time(built: tuple[dict[str, Any], bytes | None], reference: bytes,
          ctx: TrialContext) -> tuple[dict[str, Any], bytes | None]:
    import socket

    record, data = built
    if data is None:
        return record, None
    try:
        timed = median_timing({"trial": data}, trial_timer(ctx, reference), ctx.rounds, ctx.repeats)["trial"]
        record.update(timed, speedup=1.0 / timed["ratio"], timed_on=socket.gethostname())
    except Exception as e:  # recorded, the search goes on
        record.update(status="failed", error=f"timing failed: {type(e).__name__}: {str(e)[:200]}")
        return record, None
    return record, data


def _retime(models: dict[str, bytes], reference: bytes, ctx: TrialContext, rounds: int) -> dict[str, dict[str, float]]:
    return trial_timer(ctx, reference)(models, rounds)


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on: Ray itself retries such an address for minutes."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms: Ray answers those at once
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3.0).close()
    except OSError as e:
        raise TargetUnavailableError(
            f"cannot reach the Ray cluster at {address!r}: {e.strerror or type(e).__name__}",
            hint="start one with 'ray start --head', or use --ray-address local") from e


class RayPool:
    """A connection to Ray (see the module docstring); ``submit`` returns a handle ``wait`` resolves."""

    def __init__(self, address: str, ctx: TrialContext) -> None:
        try:
            import ray
        except ImportError as e:
            raise UsageError("--ray-address needs Ray", hint="pip install 'onnxforge[ray]'") from e
        self.ray = ray
        self.owned = address == "local"
        if not self.owned:
            _check_reachable(address)
        try:
            with keep_signal_handlers():
                if self.owned:
                    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                             object_store_memory=256 * 1024 * 1024, configure_logging=False)
                else:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as e:  # ConnectionError, RuntimeError, ValueError: all mean "not reachable here"
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise TargetUnavailableError(f"cannot reach the Ray cluster at {address!r}: {first}",
                                         hint="start one with 'ray start --head', or use --ray-address local") from e
        try:
            self._setup(ctx)
        except BaseException:
            self.close()
            raise

    def _setup(self, ctx: TrialContext) -> None:
        ray = self.ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.node_cpus = max(1, int(min(n["Resources"].get("CPU", 1) for n in nodes)))
        self.parallelism = max(1, int(sum(n["Resources"].get("CPU", 1) for n in nodes)))
        self.nodes = len(nodes)
        self.ctx = ctx
        self._reference = ray.put(Path(ctx.reference_model).read_bytes())
        self._build = ray.remote(num_cpus=1, max_retries=0)(_build)
        self._time = ray.remote(max_retries=0)(_time).options(num_cpus=self.node_cpus)
        self._retime = ray.remote(max_retries=0)(_retime).options(num_cpus=self.node_cpus)

    def describe(self) -> str:
        return (f"Ray: {self.nodes} node(s), {self.parallelism} CPUs; "
                f"each timing holds {self.node_cpus} CPUs (a whole node)")

    def submit(self, number: int, plan: TrialPlan) -> Any:
        return self._time.remote(self._build.remote(number, plan, self.ctx), self._reference, self.ctx)

    def wait_any(self, handles: list[Any], timeout: float | None = None) -> list[Any]:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        return done

    def result(self, handle: Any) -> tuple[dict[str, Any], bytes | None]:
        return self.ray.get(handle)

    def retime(self, models: dict[str, str], rounds: int) -> dict[str, dict[str, float]]:
        payload = {name: Path(path).read_bytes() for name, path in models.items()}
        return self.ray.get(self._retime.remote(payload, self._reference, self.ctx, rounds))

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            with keep_signal_handlers():
                self.ray.shutdown()
