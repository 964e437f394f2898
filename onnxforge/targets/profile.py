"""``onnxforge profile``: latency of a model on a target over batch sizes and thread counts,
with inputs from the user's samples or generated from the declared shapes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxforge.model_io import input_specs, load_model
from onnxforge.targets import get_target
from onnxforge.targets.feeds import batch_from_samples, generate_feeds
from onnxforge.targets.latency import LatencyStats, measure_latency

__all__ = ["ProfileConfig", "ProfileResult", "profile"]


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    target: str = "cpu"
    batch_sizes: tuple[int, ...] = (1,)
    threads: tuple[int | None, ...] = (None,)
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    sample_data: Path | None = None
    warmup: int = 5
    min_runs: int = 20
    min_seconds: float = 1.0

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "batch_sizes": list(self.batch_sizes),
            "threads": list(self.threads),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "sample_data": str(self.sample_data) if self.sample_data else None,
        }


@dataclass
class ProfileRow:
    batch: int
    threads: int | None
    latency: LatencyStats

    def to_json(self) -> dict:
        return {"batch": self.batch, "threads": self.threads, **self.latency.to_json()}


@dataclass
class ProfileResult:
    path: Path
    target: str
    rows: list[ProfileRow]

    def to_json(self) -> dict:
        return {"path": str(self.path), "target": self.target, "rows": [r.to_json() for r in self.rows]}


def _feeds(model, config: ProfileConfig, batch: int) -> dict[str, np.ndarray]:
    specs = input_specs(model)
    if config.sample_data is not None:
        from onnxforge.pipeline.calibration import load_samples

        samples = load_samples(config.sample_data, specs)
        return batch_from_samples(samples.inputs, batch)
    # --batch sets the first dim; --input-shape gives the others (a fixed batch in the model still wins)
    fixed_batch = {s.name for s in specs if s.shape and isinstance(s.shape[0], int)}
    overrides = {k: v if k in fixed_batch else (batch, *v[1:]) for k, v in config.input_shapes.items()}
    return generate_feeds(specs, batch=batch, overrides=overrides)


def profile(model_path: str | os.PathLike, config: ProfileConfig = ProfileConfig()) -> ProfileResult:
    """Measure latency for every (batch, threads) pair in the config."""
    target = get_target(config.target)
    target.require()
    model = load_model(model_path)
    rows = []
    for threads in config.threads:
        session = target.session(model_path, threads=threads)
        for batch in config.batch_sizes:
            feeds = _feeds(model, config, batch)
            stats = measure_latency(
                session, feeds, warmup=config.warmup, min_runs=config.min_runs, min_seconds=config.min_seconds
            )
            rows.append(ProfileRow(batch, threads, stats))
    return ProfileResult(Path(model_path), target.name, rows)


