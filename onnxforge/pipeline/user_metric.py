"""A metric the user writes: ``--metric file.py:score`` (recipe ``metric: file.py:score``, API
``metric="file.py:score"``).

The contract::

    def score(outputs: dict[str, np.ndarray], labels: np.ndarray | None,
              reference: dict[str, np.ndarray] | None) -> float

``outputs`` maps each model output's name to its values over every evaluation sample (batched:
the sample axis first; an object array of per-sample arrays for variable-length samples);
``labels`` is the data's ``label`` array, or None; ``reference`` is the input model's outputs on
the same samples (what the candidate is compared with; for the input model itself, its own
outputs). Higher is better. The gate passes a candidate whose score is at most ``--tolerance``
(in the metric's own units; default 0) below the input model's.

The file runs only because the user named it, and only in a child process
(``converters._isolation.call_in_child``), like a ``file.py:callable`` export source: it may not
end or hang onnxforge. Data files never execute code. The file's bytes are part of the stage's
cache key (``codec.fingerprint`` hashes the path's content), so editing the metric reruns the stage.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxforge.errors import RecipeError, UsageError
from onnxforge.pipeline import codec

__all__ = ["CONTRACT", "UserMetric", "UserMetricError", "parse_user_metric"]

CONTRACT = ("score(outputs: dict[name, array over all samples], labels: array | None, "
            "reference: dict[name, array] | None) -> float, higher is better")
METRIC_TIMEOUT_S = 600.0


class UserMetricError(UsageError):
    """A user metric (file.py:function) that is missing, raised, or returned something other than a number."""


@dataclass(frozen=True, kw_only=True)
class UserMetric:
    """``file.py:function``: the user's metric (see the module doc for the contract)."""

    path: Path
    function: str

    def __str__(self) -> str:
        return f"{self.path}:{self.function}"

    def score(self, outputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
              reference: Mapping[str, np.ndarray] | None) -> float:
        """The user's score of ``outputs`` (in a child process); UserMetricError naming the file when
        the function raised or returned no finite number."""
        from onnxforge.converters._isolation import call_in_child
        from onnxforge.errors import ModelSourceError

        if not self.path.is_file():
            raise UserMetricError(f"metric {self}: {self.path} does not exist")
        try:
            value = call_in_child("onnxforge.pipeline.user_metric:score_in_child",
                                  (str(self.path.resolve()), self.function, dict(outputs), labels,
                                   None if reference is None else dict(reference)), {},
                                  source=str(self), task="metric", timeout=METRIC_TIMEOUT_S)
        except UserMetricError:
            raise
        except ModelSourceError as e:
            raise UserMetricError(f"metric {self}: {e.message}", hint=e.hint) from e
        except RuntimeError as e:  # a crash the child could not report as an error
            raise UserMetricError(f"metric {self}: {e}") from e
        return float(value)


def score_in_child(path: str, function: str, outputs: dict, labels: np.ndarray | None,
                   reference: dict | None) -> float:
    """In the child: import ``path`` as a module, call its ``function``, check the answer is a finite number."""
    import importlib.util
    import sys

    where = f"{path}:{function}"
    try:
        spec = importlib.util.spec_from_file_location(f"_onnxforge_metric_{abs(hash(path))}", path)
        if spec is None or spec.loader is None:
            raise UserMetricError(f"metric {where}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(Path(path).parent))  # the metric may import its neighbours
        spec.loader.exec_module(module)
    except UserMetricError:
        raise
    except Exception as e:
        raise UserMetricError(f"metric {where}: importing it raised {type(e).__name__}: {_first_line(e)}") from None
    call = getattr(module, function, None)
    if not callable(call):
        raise UserMetricError(f"metric {where}: {Path(path).name} has no function {function!r}",
                              hint=f"the contract: {CONTRACT}")
    try:
        value = call(outputs, labels, reference)
    except Exception as e:
        raise UserMetricError(f"metric {where} raised {type(e).__name__}: {_first_line(e)}") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise UserMetricError(f"metric {where} returned {value!r}, not a finite number",
                              hint=f"the contract: {CONTRACT}")
    return number


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def parse_user_metric(text: str, base: Path | None = None) -> UserMetric | None:
    """``file.py:function`` -> UserMetric (the path resolved against ``base`` when relative); None for
    anything else (a built-in metric's name)."""
    path_text, sep, function = str(text).rpartition(":")
    if not sep or not path_text.endswith(".py"):
        return None
    if not function.isidentifier():
        raise UsageError(f"metric {text!r}: {function!r} is not a Python function name",
                         hint="write --metric file.py:function")
    path = Path(path_text)
    if base is not None and not path.is_absolute():
        path = base / path
    return UserMetric(path=path, function=function)


def _decode(value: object, where: str, base: Path | None) -> UserMetric:
    from onnxforge.pipeline.evaluate import Metric

    choices = ", ".join(m.value for m in Metric if m is not Metric.USER)
    found = parse_user_metric(value, base) if isinstance(value, str) else None
    if found is None:
        raise RecipeError(f"{where}: {value!r} is not one of {choices}, or file.py:function (a user metric)")
    if base is not None and not found.path.is_file():
        raise RecipeError(f"{where}: file {found.path} does not exist")
    return found


codec.register_type(UserMetric, lambda m: os.fspath(m.path) + ":" + m.function, _decode)
