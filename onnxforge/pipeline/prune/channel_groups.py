"""Channel dependency groups over an ONNX graph (the DepGraph idea, arXiv 2301.12900): the bookkeeping.

Rule: removing channel c of a tensor is only legal when every parameter slice and every other
tensor dimension that is coupled to it is removed as well. For each tensor that carries channels we
keep a *layout*: the axis the channels live on, an ``expand`` factor (a flattened NCHW tensor holds
channel c at features [c*HW, (c+1)*HW)) and a list of *segments* ``(group, length)`` (a Concat along
the channel axis lays its inputs' groups side by side; everything else has one segment). How each op
couples the groups of its inputs and outputs is in onnxforge.pipeline.prune.coupling, which walks
the graph and fills a ChannelGroups.

Groups are merged with union-find. A group is *blocked* (left alone, with the reason listed) when
any of its tensors reaches a graph input or output, an op we do not understand, a grouped Conv it
cannot split evenly, or a shape we cannot follow. Blocking is conservative: an unknown op can never
be broken by pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.pipeline.codec import JsonResult
from onnxforge.pipeline.prune.graph import layer_name

__all__ = ["ChannelGroup", "ChannelGroups", "Layout", "ParamSlice", "value_shape"]


@dataclass(frozen=True)
class Layout:
    axis: int
    expand: int
    segments: tuple[tuple[int, int], ...]  # (group id before union-find resolution, channels)

    @property
    def width(self) -> int:
        return sum(n for _, n in self.segments) * self.expand


@dataclass(frozen=True)
class ParamSlice:
    """Axis ``axis`` of ``node.inputs[index]`` (a constant) is indexed like the channels of ``ref``."""

    node: ir.Node
    index: int
    axis: int
    ref: ir.Value
    role: str  # "producer" (output channels), "consumer" (input channels) or "follower"
    groups: int = 1  # > 1: a grouped Conv's weight input axis, holding block g's channels for outputs of block g


@dataclass
class ChannelGroup(JsonResult):
    """Channels that must be removed together: their count, the layers involved, and why not, if blocked.
    ``root`` (union-find bookkeeping) is not saved; ``prunable`` is derived (``json_extra``)."""

    id: int
    root: int = field(metadata={"json": False})
    channels: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    blocks: int = 1  # the channels form this many equal blocks that keep equal counts (grouped Convs)

    @property
    def prunable(self) -> bool:
        return not self.blocked and bool(self.producers) and self.channels > 1

    def json_extra(self) -> dict[str, Any]:
        return {"prunable": self.prunable}


def value_shape(value: ir.Value | None) -> list[int | None] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


class ChannelGroups:
    """What :func:`onnxforge.pipeline.prune.coupling.find_channel_groups` fills: groups (union-find),
    layouts, parameter slices and index bookkeeping. The coupling rules call the methods below."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._parent: list[int] = []
        self._channels: list[int] = []
        self._blocked: dict[int, list[str]] = {}
        self._producers: dict[int, list[str]] = {}
        self._consumers: dict[int, list[str]] = {}
        self._blocks: dict[int, int] = {}
        self.layouts: dict[ir.Value, Layout] = {}
        self.params: list[ParamSlice] = []
        self.group_attrs: list[tuple[ir.Node, ir.Value]] = []  # depthwise Conv 'group' follows the value
        self.shape_literals: list[tuple[ir.Node, int, ir.Value]] = []  # Reshape shape[pos] = width(value)
        self.skipped: dict[str, str] = {}  # layer name -> why it cannot be pruned

    # -- union-find ---------------------------------------------------------------------------
    def new_group(self, channels: int, blocked: str | None = None) -> int:
        """A new group of ``channels`` channels (blocked with that reason when ``blocked``); its id."""
        gid = len(self._parent)
        self._parent.append(gid)
        self._channels.append(channels)
        if blocked:
            self._blocked.setdefault(gid, []).append(blocked)
        return gid

    def find(self, gid: int) -> int:
        while self._parent[gid] != gid:
            self._parent[gid] = self._parent[self._parent[gid]]
            gid = self._parent[gid]
        return gid

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self._parent[rb] = ra
        self._blocked.setdefault(ra, []).extend(self._blocked.pop(rb, []))
        self._producers.setdefault(ra, []).extend(self._producers.pop(rb, []))
        self._consumers.setdefault(ra, []).extend(self._consumers.pop(rb, []))
        blocks = self._blocks.pop(rb, 1)
        if blocks > 1:
            self.split_blocks(ra, blocks, "a grouped Conv")

    def split_blocks(self, gid: int, blocks: int, why: str) -> None:
        """Require ``gid``'s channels to shrink by the same count in each of ``blocks`` equal blocks."""
        root = self.find(gid)
        merged = int(np.lcm(self._blocks.get(root, 1), blocks))
        if self._channels[root] % merged:
            reasons = self._blocked.setdefault(root, [])
            reasons.append(f"{why} needs {merged} equal blocks of {self._channels[root]} channels")
        self._blocks[root] = merged

    def block(self, layout: Layout | None, reason: str) -> None:
        """Leave every group of ``layout`` alone, for ``reason``."""
        if layout is None:
            return
        for gid, _ in layout.segments:
            reasons = self._blocked.setdefault(self.find(gid), [])
            if reason not in reasons:
                reasons.append(reason)

    def tie(self, a: Layout, b: Layout, reason: str) -> bool:
        """Merge the groups of two layouts segment by segment; block both (False) when they do not line up."""
        if a.expand != b.expand or [n for _, n in a.segments] != [n for _, n in b.segments]:
            self.block(a, reason)
            self.block(b, reason)
            return False
        for (ga, _), (gb, _) in zip(a.segments, b.segments, strict=True):
            self._union(ga, gb)
        return True

    # -- layouts ------------------------------------------------------------------------------
    def layout_of(self, value: ir.Value, axis: int, why: str, channels: int | None = None) -> Layout | None:
        """The value's layout with channels on ``axis``; a fresh blocked group when it has none.

        ``channels`` is the count the caller knows (a consumer's weight axis) for a value whose shape
        inference left unknown; a fresh group must hold the real count, or the consumer's weight would
        be cut to the zero channels an unknown shape stood for. Without either, None (blocked).
        """
        layout = self.layouts.get(value)
        if layout is None:
            shape = value_shape(value)
            known = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
            channels = known or channels
            if not channels:
                return None
            producer = value.producer()
            source = "a graph input" if value.is_graph_input() else (
                f"{producer.op_type} {layer_name(producer)}" if producer else "a constant")
            gid = self.new_group(channels, f"channels come from {source}")
            layout = Layout(axis % len(shape) if shape else axis, 1, ((gid, channels),))
            self.layouts[value] = layout
            return layout
        rank = len(value.shape) if value.shape is not None else None
        if layout.axis != (axis if axis >= 0 or rank is None else axis + rank):
            self.block(layout, f"{why} reads another axis")
            return None
        return layout

    def add_producer(self, node: ir.Node, out: ir.Value, axis: int, channels: int) -> Layout:
        """A new group starting at ``node``'s output ``out`` (channels on ``axis``)."""
        gid = self.new_group(channels)
        self._producers.setdefault(gid, []).append(layer_name(node))
        layout = Layout(axis, 1, ((gid, channels),))
        self.layouts[out] = layout
        return layout

    def add_consumer(self, node: ir.Node, layout: Layout) -> None:
        """Record ``node`` as reading the groups of ``layout`` (its input channels shrink with them)."""
        for gid, _ in layout.segments:
            self._consumers.setdefault(self.find(gid), []).append(layer_name(node))

    def block_inputs(self, node: ir.Node, reason: str) -> None:
        """Block every group ``node`` reads (an op whose channels we cannot follow)."""
        for value in node.inputs:
            if value is not None and value in self.layouts:
                self.block(self.layouts[value], reason)

    # -- results ------------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        roots: dict[int, ChannelGroup] = {}
        for gid in range(len(self._parent)):
            root = self.find(gid)
            if root not in roots:
                roots[root] = ChannelGroup(
                    id=len(roots),
                    root=root,
                    channels=self._channels[root],
                    producers=list(dict.fromkeys(self._producers.get(root, []))),
                    consumers=list(dict.fromkeys(self._consumers.get(root, []))),
                    blocked=list(dict.fromkeys(self._blocked.get(root, []))),
                    blocks=self._blocks.get(root, 1),
                )
        return [g for g in roots.values() if g.producers or g.consumers]

    def indices(self, value: ir.Value, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Positions along the value's channel axis that survive, given kept channels per root."""
        layout = self.layouts[value]
        parts, offset = [], 0
        for gid, n in layout.segments:
            kept = keep.get(self.find(gid))
            parts.append(offset + (np.arange(n) if kept is None else kept))
            offset += n
        channels = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if not len(channels):
            raise ValueError(f"no channel of {value.name} would survive")  # a rewrite must never make a 0-dim
        if layout.expand == 1:
            return channels
        return (channels[:, None] * layout.expand + np.arange(layout.expand)[None, :]).ravel()

    def roots(self, value: ir.Value) -> list[int]:
        layout = self.layouts.get(value)
        return [self.find(g) for g, _ in layout.segments] if layout else []
