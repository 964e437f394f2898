"""Per-group ratios for channel pruning: a sensitivity scan, and multipliers by depth.

Sensitivity: each prunable group alone is pruned at R (no repair); its sensitivity s_g is the relative
output error on calibration samples, and R_g ~ s_g^-1/2. Depth: the prunable groups, in graph order of
their first producer, are split into N equal buckets (early ... late) and R_g is multiplied by its
bucket's scale. Either way the ratios are then scaled so that the channels removed in total stay R of
all prunable channels, and clipped to ``MAX_GROUP_RATIO``: the allocation moves pruning between layers,
the ratio alone sets how much.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxforge.errors import CalibrationDataError
from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.progress import Progress, counted, ignore
from onnxforge.pipeline.prune.activations import batches_of_values
from onnxforge.pipeline.prune.channel_config import Allocation, ChannelPruneConfig
from onnxforge.pipeline.prune.channel_rewrite import prune_model
from onnxforge.pipeline.prune.coupling import find_channel_groups
from onnxforge.pipeline.prune.graph import prepared

__all__ = ["MAX_GROUP_RATIO", "allocated_ratios", "depth_scaled", "sensitivity_ratios"]

MAX_GROUP_RATIO = 0.9


def allocated_ratios(model: onnx.ModelProto, config: ChannelPruneConfig, calibration: SampleSet | None,
                     input_shapes: dict[str, tuple[int, ...]] | None = None,
                     progress: Progress = ignore) -> dict[int, float] | None:
    """Per-group ratios (group id -> ratio) for ``config.allocation`` and ``config.depth_scales``; None
    when every group is pruned at ``config.ratio`` (uniform, no depth scales)."""
    ratios = None
    if config.allocation is Allocation.SENSITIVITY:
        if calibration is None:  # never: the config refuses sensitivity without calibration data
            raise CalibrationDataError("the sensitivity scan needs calibration data")
        ratios, _ = sensitivity_ratios(model, config, calibration, progress=progress)
    if config.depth_scales and config.ratio > 0:
        ratios = depth_scaled(model, config, ratios, input_shapes)
    return ratios


def sensitivity_ratios(
    model: onnx.ModelProto, config: ChannelPruneConfig, calibration: SampleSet, max_ratio: float = MAX_GROUP_RATIO,
    progress: Progress = ignore,
) -> tuple[dict[int, float], dict[int, float]]:
    """Per-group ratios from a sensitivity scan: (ratios by group id, sensitivities by group id).

    Each prunable group alone is pruned at ``config.ratio`` (no repair) and its sensitivity s_g is
    the relative output error on the calibration samples. Ratios r_g ~ s_g^-1/2, scaled so that the
    channels removed in total equal ``config.ratio`` of all prunable channels (then clipped to
    ``max_ratio``): robust groups give up more, sensitive ones less.
    """
    shapes = _shapes_of(calibration)
    baseline = prune_model(model, config, calibration, group_ratios={}, input_shapes=shapes)
    prunable = {g["id"]: g["channels"] for g in baseline.groups if g["prunable"]}
    reference = _model_outputs(model, calibration)
    sensitivity = {}
    for gid in counted(progress, "sensitivity scan: groups scored", list(prunable), len(prunable)):
        probe = prune_model(model, config, calibration, group_ratios={gid: config.ratio}, input_shapes=shapes)
        out = _model_outputs(probe.model, calibration)
        sensitivity[gid] = float(np.linalg.norm(out - reference) / max(float(np.linalg.norm(reference)), 1e-12))
    weights = {gid: float(1.0 / np.sqrt(s + 1e-6)) for gid, s in sensitivity.items()}
    return _scaled_to_total(weights, prunable, config.ratio, max_ratio), sensitivity


def depth_scaled(model: onnx.ModelProto, config: ChannelPruneConfig, ratios: dict[int, float] | None,
                 input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[int, float]:
    """``ratios`` (group id -> ratio; None: ``config.ratio`` for every prunable group) multiplied by
    ``config.depth_scales`` bucket by bucket (see the module doc), scaled back to ``config.ratio`` in total."""
    graph = prepared(model, input_shapes).graph  # the same graph and groups prune_model finds
    position = {node.name: i for i, node in enumerate(graph)}
    groups = [g for g in find_channel_groups(graph, config.exclude_nodes).groups() if g.prunable]
    groups.sort(key=lambda g: min(position.get(name, len(position)) for name in g.producers))
    scales = config.depth_scales
    weights = {}
    for i, g in enumerate(groups):
        base = config.ratio if ratios is None else ratios.get(g.id, 0.0)
        weights[g.id] = base * scales[i * len(scales) // len(groups)]
    return _scaled_to_total(weights, {g.id: g.channels for g in groups}, config.ratio, MAX_GROUP_RATIO)


def _scaled_to_total(weights: dict[int, float], channels: dict[int, int], ratio: float, max_ratio: float
                     ) -> dict[int, float]:
    """``weights`` scaled so that sum(r_g * C_g) = ``ratio`` * sum(C_g), each then clipped to ``max_ratio``."""
    removed = sum(weights[g] * channels[g] for g in channels)
    if removed <= 0:
        return {g: 0.0 for g in channels}
    scale = ratio * sum(channels.values()) / removed
    return {g: float(min(max_ratio, scale * weights[g])) for g in channels}


def _shapes_of(samples: SampleSet | None) -> dict[str, tuple[int, ...]] | None:
    return None if samples is None else {k: tuple(v.shape) for k, v in samples.first_batch(1).items()}


def _model_outputs(model: onnx.ModelProto, samples: SampleSet) -> np.ndarray:
    name = model.graph.output[0].name
    chunks = [values[name] for _, values, _ in batches_of_values(model, samples, [name], 32)]
    return np.concatenate(chunks).astype(np.float64)
