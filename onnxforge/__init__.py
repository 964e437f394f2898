"""onnxforge: export, simplify, quantize, prune and profile ONNX models for deployment.

The Python API mirrors the CLI: each function takes the same config object its subcommand builds.

    import onnxforge
    onnxforge.export("model.py:build", "model.onnx", onnxforge.ExportConfig(input_shapes={"x": (1, 3, 224, 224)}))
    onnxforge.quantize("model.onnx", "model.int8.onnx", "calib.npz", onnxforge.QuantizeConfig())

Names resolve lazily, so ``import onnxforge`` stays cheap (torch loads only when exporting).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "export": ("onnxforge.converters", "export"),
    "ExportConfig": ("onnxforge.converters.config", "ExportConfig"),
    "Exporter": ("onnxforge.converters.config", "Exporter"),
    "simplify": ("onnxforge.pipeline.simplify", "simplify"),
    "SimplifyConfig": ("onnxforge.pipeline.simplify", "SimplifyConfig"),
    "quantize": ("onnxforge.pipeline.quantize", "quantize"),
    "QuantizeConfig": ("onnxforge.pipeline.quantize", "QuantizeConfig"),
    "prune": ("onnxforge.pipeline.prune.magnitude", "prune_magnitude"),
    "MagnitudePruneConfig": ("onnxforge.pipeline.prune.magnitude", "MagnitudePruneConfig"),
    "profile": ("onnxforge.targets.profile", "profile"),
    "ProfileConfig": ("onnxforge.targets.profile", "ProfileConfig"),
    "inspect": ("onnxforge.inspection", "inspect_model"),
    "merge": ("onnxforge.pipeline.merge", "merge"),
    "MergeConfig": ("onnxforge.pipeline.merge", "MergeConfig"),
    "load_recipe": ("onnxforge.pipeline.recipe", "load_recipe"),
    "run": ("onnxforge.pipeline.runner", "run_recipe"),
    "demo": ("onnxforge.demo", "demo"),
    "optimize": ("onnxforge.pipeline.search", "optimize"),
    "OptimizeConfig": ("onnxforge.pipeline.search", "OptimizeConfig"),
    "get_target": ("onnxforge.targets", "get_target"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'onnxforge' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
