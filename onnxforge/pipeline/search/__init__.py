"""The search behind ``onnxforge optimize``: a Pareto front of whole-pipeline configurations whose
fitness (accuracy and latency or size) is measured on the target; see ``optimize.py``."""

from onnxforge.pipeline.search.config import Objective, OptimizeConfig, Strategy
from onnxforge.pipeline.search.optimize import OptimizeResult, optimize

__all__ = ["Objective", "OptimizeConfig", "OptimizeResult", "Strategy", "optimize"]
