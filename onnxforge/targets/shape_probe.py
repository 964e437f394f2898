"""Sizes for a model's dynamic non-batch dims that the model actually runs with, when no data says them.

A declared ``?`` says nothing of what the graph accepts: PP-OCRv4's recognizer takes ``x`` of
``[N, 3, ?, ?]`` but its neck concatenates a pooled height with a fixed one, so any height above 64
fails inside a Concat. Rule: dims that share a symbolic name share a size; the stated guess
(feeds.guessed_size: 224 for image sides, 128 otherwise) is tried first; when onnxruntime refuses it, every
guessed dim takes the same smaller size, largest first (``_FALLBACK_SIZES`` below the guess), until one
run succeeds; then each dim, one at a time, is raised back to its guess where the model still runs (a
width that can stay 224 while the height must be 64). Every try is one batch-1 run of the session on
generated inputs; a shape that was never run is never returned.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from onnxforge.errors import UsageError, first_line
from onnxforge.model_io import TensorSpec
from onnxforge.targets.feeds import generate_feeds, guessed_size

__all__ = ["ProbedShapes", "probe_shapes"]

_FALLBACK_SIZES = (512, 384, 320, 256, 224, 192, 160, 128, 96, 64, 48, 32, 16, 8, 4, 2, 1)

DimKey = tuple[str, int]  # (input name, axis)


@dataclass
class ProbedShapes:
    """Shapes (batch 1) for the inputs that had guessed dims, and what was tried to find them."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tries: int = 0
    first_failure: str = ""  # why the stated guess did not run (empty when it did)

    def describe(self) -> str:
        """What a report says of the shapes (the shapes themselves are printed beside it)."""
        if not self.shapes:
            return ""
        names = ", ".join(self.shapes)
        if not self.first_failure:
            return f"dynamic dims of {names} guessed"
        return (f"dynamic dims of {names}: the guessed sizes failed ({self.first_failure}), so the largest sizes the "
                f"model ran with ({self.tries} runs tried)")


def _why(e: Exception) -> str:
    """onnxruntime's refusal in a few words: the failing node when it names one."""
    found = re.search(r"running (\w+) node\. Name:'([^']*)'", str(e))
    return f"in {found[1]} node {found[2]}".rstrip() if found else first_line(e, 120)


def _dynamic_dims(specs: Sequence[TensorSpec], overrides: Mapping[str, tuple[int, ...]]) -> dict[str, list[DimKey]]:
    """Guessed dims grouped by their symbolic name (a nameless or ``?`` dim is its own group)."""
    groups: dict[str, list[DimKey]] = {}
    for spec in specs:
        if spec.name in overrides:
            continue
        for axis, dim in enumerate(spec.shape):
            if axis == 0 or isinstance(dim, int):
                continue
            key = dim if isinstance(dim, str) and dim not in ("", "?") else f"{spec.name}:{axis}"
            groups.setdefault(key, []).append((spec.name, axis))
    return groups


def probe_shapes(
    session: Any, specs: Sequence[TensorSpec], overrides: Mapping[str, tuple[int, ...]], model: Any = None
) -> ProbedShapes:
    """Shapes at batch 1 for the inputs not in ``overrides`` that have dynamic non-batch dims, each one
    that ``session`` ran on generated inputs (see the module doc). UsageError when no size runs."""
    groups = _dynamic_dims(specs, overrides)
    if not groups:
        return ProbedShapes()
    by_name = {s.name: s for s in specs}
    guess = {key: guessed_size(by_name[dims[0][0]], dims[0][1]) for key, dims in groups.items()}
    probed = ProbedShapes()

    def shapes_for(sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, list[int]] = {}
        for key, dims in groups.items():
            for name, axis in dims:
                spec = by_name[name]
                shape = shapes.setdefault(name, [d if isinstance(d, int) else 1 for d in spec.shape])
                shape[axis] = sizes[key]
        return {name: (1, *shape[1:]) for name, shape in shapes.items()}

    def runs(sizes: Mapping[str, int]) -> bool:
        probed.tries += 1
        feeds = generate_feeds(specs, batch=1, overrides={**overrides, **shapes_for(sizes)}, model=model, guess=True)
        try:
            session.run(None, feeds)
        except Exception as e:  # onnxruntime's refusal of these sizes is the answer being looked for
            probed.first_failure = probed.first_failure or _why(e)
            return False
        return True

    if runs(guess):
        probed.shapes = shapes_for(guess)
        return probed
    for size in (s for s in _FALLBACK_SIZES if s < max(guess.values())):
        sizes = dict.fromkeys(groups, size)
        if runs(sizes):
            break
    else:
        raise UsageError(
            f"no size of the dynamic dims of {', '.join(sorted({n for d in groups.values() for n, _ in d}))} "
            f"runs: the guessed sizes failed ({probed.first_failure}) and so did every smaller size down to 1",
            hint="give the shapes with --input-shape NAME=DIMS, or real inputs with --data",
        )
    for key in groups:  # raise each dim back to its guess where the model still runs
        raised = {**sizes, key: guess[key]}
        if guess[key] > sizes[key] and runs(raised):
            sizes = raised
    probed.shapes = shapes_for(sizes)
    return probed
