"""The run folder's ``manifest.json``: every stage's output file (sha256, size, inputs/outputs,
opset), the config used, tool versions, measured metrics, and which stages completed.

It is rewritten atomically after every stage, so an interrupted run still says what it finished.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from onnxforge._atomic import atomic_write_text
from onnxforge.model_io import default_opset, file_sha256, input_specs, model_file_size, output_specs
from onnxforge.pipeline.codec import JsonResult, rounded

__all__ = ["Manifest", "StageRecord", "describe_file", "machine_description", "tool_versions"]

MANIFEST_NAME = "manifest.json"
_TOOLS = ("onnxforge", "onnx", "onnxruntime", "torch", "onnxsim", "onnxslim", "onnxscript", "onnx-ir", "numpy", "keras")


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def describe_file(path: Path, relative_to: Path | None = None) -> dict[str, Any]:
    model = onnx.load(str(path), load_external_data=False)
    shown = os.path.relpath(path, relative_to) if relative_to else str(path)
    return {
        "path": shown,
        "sha256": file_sha256(path),
        "bytes": model_file_size(path),
        "opset": default_opset(model),
        "inputs": [s.to_json() for s in input_specs(model)],
        "outputs": [s.to_json() for s in output_specs(model)],
    }


@dataclass(kw_only=True)
class StageRecord(JsonResult):
    """One stage of a run as ``manifest.json`` holds it (fields in the order the file shows them)."""

    name: str
    kind: str
    status: str  # done | cached | failed | quality-gate-failed
    verified: bool = True
    summary: str = ""  # one phrase from the pass's summary(), for the run table and the report
    cache: str = ""  # how the cache answered: cached, not cached, forced, a tampered entry recomputed
    inputs: list[str] = field(default_factory=list)  # what the stage read: source spec or stage files
    key: str
    seconds: float = field(metadata={"encode": rounded(3)})
    config: dict[str, Any]
    output: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None

    def output_file(self) -> dict[str, Any]:
        """``output`` of a stage that wrote one (done, cached): path, sha256, bytes, inputs, outputs."""
        if self.output is None:
            raise ValueError(f"stage {self.name} ({self.status}) has no output file")
        return self.output


@dataclass
class Manifest:
    run_dir: Path
    recipe: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)
    baseline: StageRecord | None = None  # the input .onnx of a recipe without an export stage
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def path(self) -> Path:
        return self.run_dir / MANIFEST_NAME

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "onnxforge-manifest/1",
            "created": self.created,
            "tool_versions": tool_versions(),
            "machine": machine_description(),
            "recipe": self.recipe,
            "input": self.baseline.to_json() if self.baseline else None,
            "completed": [s.name for s in self.stages if s.status in ("done", "cached")],
            "stages": [s.to_json() for s in self.stages],
        }

    def write(self) -> Path:
        atomic_write_text(self.path, json.dumps(self.to_json(), indent=2, default=str) + "\n")
        return self.path
