"""onnxforge: export, simplify, quantize, prune and profile ONNX models for deployment.

The Python API mirrors the commands: each stage function runs the one-stage recipe its command runs
(same registry, cache, quality gates) and returns the stage's record.

    import onnxforge
    onnxforge.export("model.py:build", "model.onnx", onnxforge.ExportConfig(input_shapes={"x": (1, 3, 224, 224)}))
    record = onnxforge.quantize("model.onnx", "model.int8.onnx", calibration="calib.npz", eval="eval.npz")

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
    "HfTask": ("onnxforge.converters.config", "HfTask"),
    "simplify": ("onnxforge.api", "simplify"),
    "SimplifyConfig": ("onnxforge.pipeline.simplify", "SimplifyConfig"),
    "quantize": ("onnxforge.api", "quantize"),
    "prune_channels": ("onnxforge.api", "prune_channels"),
    "low_rank": ("onnxforge.api", "low_rank"),
    "magnitude": ("onnxforge.api", "magnitude"),
    "fp16": ("onnxforge.api", "fp16"),
    "run_stage": ("onnxforge.api", "run_stage"),
    "QuantizeConfig": ("onnxforge.pipeline.quantize", "QuantizeConfig"),
    "prune": ("onnxforge.api", "prune"),
    "MagnitudePruneConfig": ("onnxforge.pipeline.prune.magnitude", "MagnitudePruneConfig"),
    "profile": ("onnxforge.targets.profile", "profile"),
    "ProfileConfig": ("onnxforge.targets.profile", "ProfileConfig"),
    "inspect": ("onnxforge.inspection", "inspect_model"),
    "merge": ("onnxforge.api", "merge"),
    "QualityGateError": ("onnxforge.errors", "QualityGateError"),
    "MergeConfig": ("onnxforge.pipeline.merge", "MergeConfig"),
    "load_recipe": ("onnxforge.pipeline.recipe", "load_recipe"),
    "run": ("onnxforge.pipeline.runner", "run_recipe"),
    "demo": ("onnxforge.demo", "demo"),
    "optimize": ("onnxforge.pipeline.search", "optimize"),
    "OptimizeConfig": ("onnxforge.pipeline.search", "OptimizeConfig"),
    "get_target": ("onnxforge.targets", "get_target"),
    "SessionSettings": ("onnxforge.targets.session_settings", "SessionSettings"),
    "session_options": ("onnxforge.targets.session_settings", "session_options"),
    "InferenceSession": ("onnxforge.targets.session_settings", "InferenceSession"),
    "tune_session": ("onnxforge.pipeline.session_tuning", "tune_session_file"),
}

__all__ = [*sorted(_API), "__version__"]


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
