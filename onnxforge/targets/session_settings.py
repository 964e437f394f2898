"""Session settings are part of the deployable: the onnxruntime session options a model was measured
fastest with, kept beside it as ``model.session.json`` and applied by ``onnxforge profile`` and the
Python API (``onnxforge.session_options(path)``, ``onnxforge.InferenceSession(path)``).

The file holds only what was measured faster than onnxruntime's defaults (``pipeline/session_tuning.py``
writes it); a setting left at its default is not written, and a model without the file runs with
onnxruntime's defaults. Settable here, on the CPU provider:

- ``graph_optimization``: basic, extended, layout or all (onnxruntime's default); ``layout`` and
  ``all`` include the CPU's NCHWc layout transform (``nchwc`` false turns just that one off through
  ``optimization.disable_specified_optimizers``, keeping the other "all" rewrites);
- ``intra_op_threads``: the intra-op thread pool (default: one thread per physical core);
- ``mem_pattern`` / ``cpu_mem_arena``: memory planning from the first run's allocations, and the
  CPU allocator's arena (both on by default).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from onnxforge.errors import OutputPathError, RecipeError, UsageError
from onnxforge.pipeline import codec

if TYPE_CHECKING:
    from onnxforge.targets.base import Target

__all__ = [
    "FORMAT",
    "GraphLevel",
    "InferenceSession",
    "SessionSettings",
    "read_settings",
    "session_options",
    "settings_for",
    "settings_path",
    "write_settings",
]

FORMAT = "onnxforge-session/1"  # the file's "format": what tells our file from a user's of the same name


class GraphLevel(enum.Enum):
    BASIC = "basic"
    EXTENDED = "extended"
    LAYOUT = "layout"
    ALL = "all"


_ORT_LEVEL = {
    GraphLevel.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    GraphLevel.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    GraphLevel.LAYOUT: ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
    GraphLevel.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True, kw_only=True)
class SessionSettings:
    """onnxruntime session options; every default is onnxruntime's own."""

    graph_optimization: GraphLevel = codec.option(GraphLevel.ALL, help="graph optimization level")
    intra_op_threads: int | None = codec.option(
        None, help="intra-op threads (default: onnxruntime's, one per physical core)")
    nchwc: bool = codec.option(True, help="the CPU's NCHWc layout transform (part of layout and all)")
    mem_pattern: bool = codec.option(True, help="memory pattern planning from the first run")
    cpu_mem_arena: bool = codec.option(True, help="the CPU allocator's memory arena")

    def __post_init__(self) -> None:
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise UsageError(f"intra_op_threads must be at least 1, got {self.intra_op_threads}")

    def changes(self) -> dict[str, Any]:
        """The fields that differ from onnxruntime's defaults, codec-encoded (empty: the defaults)."""
        default = SessionSettings()
        return {f.name: codec.encode(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.changes().items()) or "onnxruntime defaults"

    def apply(self, options: ort.SessionOptions) -> ort.SessionOptions:
        """Set these settings on ``options`` (in place; returned for chaining)."""
        options.graph_optimization_level = _ORT_LEVEL[self.graph_optimization]
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if not self.nchwc:
            options.add_session_config_entry("optimization.disable_specified_optimizers", "NchwcTransformer")
        options.enable_mem_pattern = self.mem_pattern
        options.enable_cpu_mem_arena = self.cpu_mem_arena
        return options


def settings_path(model: str | os.PathLike) -> Path:
    """Where ``model``'s settings live: ``model.onnx`` -> ``model.session.json``."""
    path = Path(model)
    return path.with_suffix(".session.json") if path.suffix == ".onnx" else path.with_name(path.name + ".session.json")


def read_settings(path: str | os.PathLike) -> SessionSettings:
    """The settings a ``.session.json`` file holds; a file that is not one is UsageError (one line)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot read session settings: {e.strerror}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: session settings are not valid JSON ({e})",
                         hint="fix or delete the file; onnxforge writes it when it tunes the session") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path}: not an onnxforge session settings file (expected \"format\": \"{FORMAT}\")",
                         hint="fix or delete the file")
    try:
        return codec.decode(SessionSettings, data.get("settings", {}), f"{path.name}: settings")
    except RecipeError as e:
        raise UsageError(f"{path}: {e.message}", hint="fix or delete the file") from e
    except UsageError as e:
        raise UsageError(f"{path}: {e.message}", hint="fix or delete the file") from e


def settings_for(model: str | os.PathLike | bytes | object) -> SessionSettings | None:
    """The settings beside ``model`` (a path), or None when it has none (or is not a file path)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    path = settings_path(model)
    return read_settings(path) if path.is_file() else None


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a session settings file onnxforge wrote (and may replace or remove)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def write_settings(model: str | os.PathLike, settings: SessionSettings, measured: dict[str, Any],
                   *reads: str | os.PathLike | None) -> Path:
    """Write ``settings`` beside ``model`` atomically with what measured them; returns the path.

    Never over an input (``reads``, the model) nor over a file of that name onnxforge did not write."""
    from onnxforge._atomic import atomic_write_text, check_output_path

    path = check_output_path(settings_path(model), model, *reads)
    if path.exists() and not is_ours(path):
        raise OutputPathError(f"{path} exists and was not written by onnxforge; not replacing it",
                              hint="move it away to keep the tuned session settings")
    payload = {"format": FORMAT, "settings": settings.changes(), "measured": measured}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def session_options(model: str | os.PathLike, target: Target | str = "cpu") -> ort.SessionOptions:
    """onnxruntime SessionOptions for ``model`` on ``target``: its ``.session.json`` applied, if it has one."""
    from onnxforge.targets import get_target

    settings = settings_for(model) or SessionSettings()
    resolved = get_target(target)
    return settings.apply(resolved.session_options(settings.intra_op_threads))


def InferenceSession(model: str | os.PathLike, target: Target | str = "cpu") -> ort.InferenceSession:
    """An ``onnxruntime.InferenceSession`` of ``model`` on ``target`` with the settings beside it applied
    (onnxruntime's defaults without a ``.session.json``)."""
    from onnxforge.targets import get_target

    return get_target(target).session(model, settings=settings_for(model))
