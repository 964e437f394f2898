"""Fitting quantize() into a memory limit: batch sizes and passes over the tensors chosen from the
model's real activation sizes, so that ``--max-memory`` is kept, not only estimated.

Sizes come from ONNX shape inference with the data's real input shapes (the first sample's; a
detector's dynamic H/W left out made the pre-load estimate 20x too small), per sample:

- ``per_sample``: every activation of one forward pass (what an augmented model returns when every
  tensor is an output: the histogram calibrators, the per-node error analysis);
- ``live``: the peak of the activations alive at once during a forward pass (a tensor is freed after
  its last consumer): what onnxruntime itself holds.

Costs per sample in a batch: a forward pass ``3 live`` (measured 1.8-2.6x; the sessions used for
calibration, scoring and the error analysis run without onnxruntime's CPU arena, whose doubling
growth keeps up to twice the peak). Calibration adds the calibrated tensors, which the augmented
model keeps alive until their ReduceMin/ReduceMax (measured: PP-OCRv4's detector at batch 1, 61 MB
plain, 427 MB augmented): ``per_sample / groups`` for MinMax, three times that for a histogram
calibrator (returned to Python and copied), with ``groups`` passes over the data each calibrating a
share of the tensors (ranges are per tensor: the same ranges). The per-node error analysis adds
``3 per_sample`` (fp32, quantized and local outputs), or, measuring a share of the nodes per pass
over the data (quant_error), ``4 (per_sample / passes + largest)``: the same numbers. Smoothing
statistics and the fusion parity check add ``per_sample``. Each phase also loads a few copies of
the model (sessions, augmented or output-marked protos).

A smaller batch gives the same MinMax ranges; onnxruntime's histogram calibrators (entropy,
percentile, distribution) size their bins from the first batch, so on a smaller batch their ranges
can move slightly. A plan never lowers a batch that fits.

Before any work, a baseline for Python and onnxruntime, the samples and four copies of the model
must leave room for a forward pass at batch 1 (else CalibrationDataError). Then each phase picks
its batch when it starts, from what is left of the limit given the memory resident *then* (freed
heap returned to the system first): imports, sessions and glibc's retained pages are counted as
they are, not guessed. Calibration and scoring that cannot run at batch 1 stop with
CalibrationDataError; an error analysis that cannot (in ``_MAX_NODE_PASSES`` passes) is skipped
with a note. Without
``--max-memory`` the limit is ``DEFAULT_SHARE`` of the memory available at the start (the OOM
killer is the alternative). tests/reliability/test_memory_guard.py reads a run's peak (VmHWM) under
a limit; benchmarks/realworld.py reports PP-OCRv4's detector under ``--max-memory 2G``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxforge.errors import CalibrationDataError
from onnxforge.model_cost import with_input_shapes
from onnxforge.pipeline.quantize.calibration_memory import BASELINE_BYTES, _gib

__all__ = [
    "ActivationProfile", "MemoryPlan", "activation_profile", "available_memory", "balanced_shares", "plan_memory",
    "tensor_sizes",
]

FORWARD_FACTOR = 3.0  # a forward pass is budgeted at this many times its live activations
DEFAULT_SHARE = 0.8  # share of the available memory used without --max-memory


@dataclass(frozen=True)
class ActivationProfile:
    per_sample: int  # bytes of every activation of one sample's forward pass
    live: int  # peak bytes alive at once during that pass
    unknown: int  # tensors whose size shape inference could not give (counted as the largest known)
    largest: int = 0  # bytes of the largest activation


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):  # undefined or not a numpy type (string, float8): as float
        return 4


def _inferred_sizes(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None
) -> tuple[onnx.ModelProto, dict[str, int | None]]:
    """(``model`` with inferred shapes, bytes per sample of each tensor it gives a shape, None where not)."""
    shaped = with_input_shapes(model, input_shapes) if input_shapes else model
    try:
        inferred = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception:
        inferred = shaped
    sizes: dict[str, int | None] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = vi.type.tensor_type
        dims = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        if dims is None or not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            sizes[vi.name] = None
            continue
        rank_batch = dims[0].dim_value if dims and not input_shapes else 1  # declared dims: a fixed batch B
        elements = int(np.prod([d.dim_value for d in dims], dtype=np.int64)) // max(rank_batch, 1)
        sizes[vi.name] = elements * _itemsize(tensor_type.elem_type)
    return inferred, sizes


def tensor_sizes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, int]:
    """Bytes per sample of each activation of ``model`` whose shape inference gives (at ``input_shapes``)."""
    _, sizes = _inferred_sizes(model, input_shapes)
    return {name: size for name, size in sizes.items() if size is not None}


def activation_profile(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> ActivationProfile:
    """Sizes of ``model``'s activations for one sample (``input_shapes``: the data's, at batch 1)."""
    inferred, sizes = _inferred_sizes(model, input_shapes)
    initializers = {i.name for i in inferred.graph.initializer}
    known = [s for s in sizes.values() if s is not None]
    largest = max(known, default=4)
    unknown = 0

    def size(name: str) -> int:
        nonlocal unknown
        value = sizes.get(name)
        if value is None:
            unknown += 1
            sizes[name] = largest  # counted once as unknown, then remembered
            return largest
        return value

    nodes = list(inferred.graph.node)
    outputs = {o.name for o in inferred.graph.output}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in [*node.input, *_subgraph_inputs(node)]:
            if name:
                last_use[name] = index
    inputs = [i.name for i in inferred.graph.input if i.name not in initializers]
    live = sum(size(n) for n in inputs)
    peak, total = live, 0
    for index, node in enumerate(nodes):
        produced = [o for o in node.output if o]
        grown = sum(size(o) for o in produced)
        total += grown
        live += grown
        peak = max(peak, live)
        for name in dict.fromkeys([*node.input, *produced]):
            if name and name not in initializers and name not in outputs and last_use.get(name, -1) <= index:
                live -= size(name)  # its last consumer ran (or it has none): onnxruntime frees it
    return ActivationProfile(per_sample=total, live=max(peak, 1), unknown=unknown, largest=largest)


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """Names an If/Loop/Scan body reads (from the outer graph, among others): they live until the node ran."""
    names = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.extend(inner.input)
                names.extend(_subgraph_inputs(inner))
    return names


def balanced_shares(names: Iterable[str], groups: int, sizes: Mapping[str, int]) -> list[set[str]]:
    """``names`` in ``groups`` shares of about equal bytes (``sizes``; unknown ones count as the average
    known one): the largest first, each to the lightest share, so the heaviest share holds at most
    its part of the total plus the largest tensor. Deterministic."""
    names = sorted(names)
    known = [sizes[n] for n in names if n in sizes]
    default = sum(known) // len(known) if known else 1
    shares: list[tuple[int, int, set[str]]] = [(0, i, set()) for i in range(groups)]
    for name in sorted(names, key=lambda n: -sizes.get(n, default)):
        weight, index, members = min(shares)
        members.add(name)
        shares[index] = (weight + sizes.get(name, default), index, members)
    return [members for _, _, members in shares]


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``Field:   N kB`` line of a /proc file, in bytes (None where there is no such file or line)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def resident_memory() -> int | None:
    """This process's resident memory now (VmRSS), after returning freed heap pages to the system."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arrays' pages; what it keeps still counts
    return _proc_bytes("/proc/self/status", "VmRSS")


_MARGIN = 64 << 20  # allocator slack between what we count and what the kernel sees
_MAX_PASSES = 8  # passes a histogram calibrator takes before a smaller batch (which can move its ranges)
_MAX_NODE_PASSES = 16  # passes over the nodes before the error analysis is skipped (each runs three sessions)
# copies of the model a phase adds: the augmented model and its session; a session; three sessions
# (fp32, quantized, local) and the protos they are built from; a session and its proto
_COPIES = {"calibration": 3, "scoring": 2, "analysis": 6, "statistics": 2}


@dataclass
class MemoryPlan:
    """The limit and the model's activation sizes; each phase asks for its batch when it starts, sized
    to what is left of the limit given the memory resident then (imports, samples, sessions kept)."""

    limit: int
    explicit: bool  # --max-memory was given (else: DEFAULT_SHARE of the available memory)
    profile: ActivationProfile
    wanted: int  # the batch asked for
    fixed_batch: int | None  # the model's own batch, when it has one
    model_bytes: int  # each phase loads the model into sessions (and copies of it) beside what is resident
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # the first sample's feeds
    chosen: dict[str, str] = field(default_factory=dict)  # phase -> what was chosen, for describe()
    reduced: bool = False  # some phase ran on less than it asked for: a smaller batch, passes, or not at all

    @property
    def forward(self) -> int:
        return int(FORWARD_FACTOR * self.profile.live)

    def _left(self) -> int:
        resident = resident_memory()
        return self.limit - (resident if resident is not None else BASELINE_BYTES) - _MARGIN

    def _fit(self, phase: str, per_sample: int, wanted: int, copies: int) -> int | None:
        left = self._left() - copies * self.model_bytes
        smallest = self.fixed_batch or 1
        if left < smallest * per_sample:
            batch = None
        else:
            batch = self.fixed_batch or int(max(1, min(wanted, left // max(per_sample, 1))))
        self.chosen[phase] = f"batch {batch}" if batch else "not run"
        self.reduced |= batch is None or batch < (self.fixed_batch or wanted)
        return batch

    def calibration_batch(self, source: str, *, histogram: bool) -> tuple[int, int]:
        """(batch, passes over the tensors) for one calibration: each pass calibrates a share of the
        tensors (the calibrated tensors stay alive until their ReduceMin/ReduceMax, or are returned to
        Python by a histogram calibrator: a share of them per pass bounds that). Shares are balanced by
        size (calibration_ranges), so the largest holds at most its part of the total plus the largest
        tensor. MinMax takes the fewest passes (each runs every batch; a batch size does not change its
        ranges); a histogram calibrator keeps the batch it asked for up to ``_MAX_PASSES`` passes."""
        factor = 3 if histogram else 1  # a histogram calibrator's outputs are returned to Python and copied
        kept, largest = factor * self.profile.per_sample, factor * self.profile.largest
        left = self._left() - _COPIES["calibration"] * self.model_bytes
        sizes = [self.fixed_batch] if self.fixed_batch else [b for b in (self.wanted, 8, 4, 2, 1) if b <= self.wanted]
        options = []  # (batch, passes) that fit
        for batch in sizes:
            room = left - batch * (self.forward + largest)
            if room > 0:
                options.append((batch, max(1, math.ceil(batch * kept / room))))
        if not options:
            need = sizes[-1] * (self.forward + largest) + _COPIES["calibration"] * self.model_bytes
            raise CalibrationDataError(
                f"{source}: calibration at batch {sizes[-1]} needs {_gib(need)}; {_gib(max(self._left(), 0))} is "
                f"left of {self.limit_text()}",
                hint="calibrate on smaller inputs, or raise --max-memory",
            )
        fewest = min(options, key=lambda o: (o[1], -o[0]))
        batch, groups = options[0] if histogram and options[0][1] <= _MAX_PASSES else fewest
        phase = "histogram calibration" if histogram else "calibration"
        self.chosen[phase] = f"batch {batch}" + (f" in {groups} passes over the tensors" if groups > 1 else "")
        self.reduced |= batch < sizes[0] or groups > 1
        return batch, groups

    def eval_batch(self, source: str, wanted: int) -> int:
        """The batch held-out samples are scored at; CalibrationDataError when not even one sample fits."""
        batch = self._fit("scoring", self.forward, wanted, _COPIES["scoring"])
        if batch is None:
            raise CalibrationDataError(f"{source}: {self.refusal('scoring')}", hint="raise --max-memory")
        return batch

    def analysis_size(self) -> tuple[int, int] | None:
        """(batch, passes over the nodes) for the per-node error analysis, whose three sessions return the
        activations of the nodes measured: all of them in one pass (``3 per_sample``), or a share per pass
        (``4 (per_sample / passes + largest)``: the share's inputs are returned too). The fewest passes,
        then the largest batch; None when not even ``_MAX_NODE_PASSES`` passes at batch 1 fit."""
        left = self._left() - _COPIES["analysis"] * self.model_bytes
        per, largest = self.profile.per_sample, self.profile.largest
        sizes = [self.fixed_batch] if self.fixed_batch else [b for b in (self.wanted, 8, 4, 2, 1) if b <= self.wanted]
        options = []
        for batch in sizes:
            if batch * (self.forward + 3 * per) <= left:
                options.append((batch, 1))
                continue
            room = left - batch * (self.forward + 4 * largest)
            passes = math.ceil(4 * batch * per / room) if room > 0 else None
            if passes is not None and passes <= _MAX_NODE_PASSES:
                options.append((batch, max(passes, 2)))
        if not options:
            self.chosen["analysis"] = "not run"
            self.reduced = True
            return None
        batch, passes = min(options, key=lambda o: (o[1], -o[0]))
        self.chosen["analysis"] = f"batch {batch}" + (f" in {passes} passes over the nodes" if passes > 1 else "")
        self.reduced |= batch < sizes[0] or passes > 1
        return batch, passes

    def statistics_batch(self) -> int | None:
        """The batch for runs that return some activations (smoothing statistics, fusion parity): a
        forward pass and at most every activation once; None when batch 1 does not fit."""
        return self._fit("statistics", self.forward + self.profile.per_sample, self.wanted, _COPIES["statistics"])

    def refusal(self, phase: str) -> str:
        """Why ``phase`` did not run: one sample's cost and what is left, against the limit."""
        per, largest = self.profile.per_sample, self.profile.largest
        least = {"scoring": 0, "analysis": 4 * (per // _MAX_NODE_PASSES + largest), "statistics": per}[phase]
        cost = (self.forward + least) * (self.fixed_batch or 1) + _COPIES[phase] * self.model_bytes
        name = {"analysis": "the per-node analysis", "statistics": "collecting activation statistics"}.get(phase, phase)
        return (f"{name} at batch {self.fixed_batch or 1} needs {_gib(cost)}; {_gib(max(self._left(), 0))} is left "
                f"of {self.limit_text()}")

    def limit_text(self) -> str:
        if self.explicit:
            return f"--max-memory {_gib(self.limit)}"
        return f"{_gib(self.limit)} ({DEFAULT_SHARE:.0%} of the memory available at the start)"

    def describe(self) -> str:
        chosen = "; ".join(f"{phase} {text}" for phase, text in self.chosen.items())
        return (f"memory plan within {self.limit_text()}: activations {_gib(self.profile.per_sample)} per sample "
                f"({_gib(self.profile.live)} alive at once); {chosen}")


def plan_memory(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None,
    samples_bytes: int,
    limit: int,
    *,
    batch: int,
    fixed_batch: int | None,
    explicit: bool,
    source: str,
) -> MemoryPlan:
    """The plan for quantizing ``model`` within ``limit`` bytes; CalibrationDataError, before any work,
    when even a forward pass at batch 1 cannot fit beside the baseline, the samples and the model."""
    profile = activation_profile(model, input_shapes)
    plan = MemoryPlan(limit, explicit, profile, batch, fixed_batch, model.ByteSize(), dict(input_shapes or {}))
    fixed = BASELINE_BYTES + samples_bytes + 4 * model.ByteSize()
    smallest = fixed_batch or 1
    if limit - fixed < smallest * plan.forward:
        raise CalibrationDataError(
            f"{source}: quantizing needs at least {_gib(fixed + smallest * plan.forward)} (a forward pass at batch "
            f"{smallest}: {_gib(smallest * plan.forward)} at the data's shapes; {_gib(samples_bytes)} of samples; "
            f"{_gib(BASELINE_BYTES)} for Python and onnxruntime), over {plan.limit_text()}",
            hint="calibrate on smaller inputs or a folder of .npz files (read one file at a time), or raise "
                 "--max-memory",
        )
    return plan
