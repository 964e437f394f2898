"""Graph simplification that never breaks parity.

Three simplifiers are tried on the same model: onnxsim (constant folding + onnx-optimizer
passes), onnxslim (pattern fusions), and onnxruntime's offline basic optimizations (constant
folding and redundant-node elimination; the extended level emits CPU-only contrib ops, so it is
not used for a portable file). Each result must load in onnxruntime and match the input model
within tolerance on the same inputs: the user's samples (``--data``, or a recipe's calibration
data) when given, since real inputs keep real activation ranges (an ImageNet CNN's export failed
parity on N(0,1) noise), else seeded N(0,1) inputs, and the result says which. The winner is chosen
by node count and file size together: among the results no more than ``MAX_GROWTH`` (and 4 KB)
larger than the smallest file (the input's included), the fewest nodes, then the smallest file. If none beats the
input, the input graph is kept: simplification never makes a model larger (measured: onnxsim grows a
dynamo MiniLM from 299 to 350 nodes; the fewest nodes of a decoder LM was a 110.7 MB file for 61.6 MB).

A model past protobuf's 2 GB is optimized by onnxruntime alone, from a file with external data:
onnxsim and onnxslim hold it as in-memory protobuf copies (on a 2.3 GB model they took 35-55 s and
5-9 GB of memory each, onnxruntime 10 s and 1.2 GB); ``--method`` still asks for either.
"""

from __future__ import annotations

import contextlib
import enum
import io
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxforge._atomic import check_output_path, paths_in
from onnxforge._ort_logs import session_options
from onnxforge.errors import first_line
from onnxforge.model_io import (
    check_model,
    fits_in_protobuf,
    runnable,
    save_model,
    serialized_size,
    stored_at,
)
from onnxforge.parity import ParityReport, Tolerance, compare_models
from onnxforge.pipeline import codec
from onnxforge.pipeline.codec import option
from onnxforge.pipeline.data_spec import DataSpec, set_data_fields
from onnxforge.pipeline.normalize import StageInput, load_stage_input
from onnxforge.pipeline.parity_feeds import parity_feeds

__all__ = ["SimplifyConfig", "SimplifyMethod", "SimplifyResult", "simplify", "simplify_model"]


class SimplifyMethod(enum.Enum):
    AUTO = "auto"
    ONNXSIM = "onnxsim"
    ONNXSLIM = "onnxslim"
    ORT = "ort"


_DEFAULT_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-3)  # frozen: one shared default is safe


@dataclass(frozen=True, kw_only=True)
class SimplifyConfig:
    method: SimplifyMethod = option(
        SimplifyMethod.AUTO,
        help="which simplifier (auto: every one, the smallest graph with parity wins)",
    )
    input_shapes: Mapping[str, tuple[int, ...]] = option(
        default_factory=dict,
        help="input shapes for simplifiers that need static shapes",
    )
    tolerance: Tolerance = option(_DEFAULT_TOLERANCE, help="parity tolerance against the input model")
    sample_data: DataSpec | None = option(  # .npz keyed by input name: parity inputs instead of random ones
        None,
        help="parity inputs (instead of random data)",
    )

    def __post_init__(self) -> None:
        set_data_fields(self, "sample_data")  # a str or Path from the Python API becomes a DataSpec



@dataclass
class Candidate(codec.JsonResult):
    method: str
    nodes: int | None
    bytes: int | None
    seconds: float = field(metadata={"encode": codec.rounded(3)})
    parity: ParityReport | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None and self.parity is not None and self.parity.ok



MAX_GROWTH = 1.05  # a result may be this much larger than the smallest file and still win on nodes
_SLACK = 4096  # bytes: shape annotations alone can make a tiny model's file grow by more than 5%


@dataclass(kw_only=True)
class SimplifyResult(codec.JsonResult):
    model: onnx.ModelProto = field(metadata={"json": False})
    path: Path | None = field(default=None, metadata={"json": False})  # set by simplify() once written
    notes: list[str] = field(default_factory=list)  # what was normalized on load, simplifiers skipped
    chosen: str
    nodes_before: int
    nodes_after: int
    bytes_before: int | None = None
    bytes_after: int | None = None
    parity_inputs: str = ""  # what parity was measured on
    candidates: list[Candidate]


def _count_nodes(model: onnx.ModelProto) -> int:
    def count(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            total += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    total += count(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(count(g) for g in attr.graphs)
        return total

    return count(model.graph)


def _run_onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model, check_n=0)
    if not ok:
        raise RuntimeError("onnxsim reported that its result is not equivalent")
    return simplified


def _run_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _run_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="onnxforge-ortopt-") as tmp, runnable(model) as source:
        out = os.path.join(tmp, "optimized.onnx")
        options = session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = out
        if isinstance(source, str):  # past 2 GB: the optimized model cannot be one protobuf either
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             "optimized.onnx.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(out, load_external_data=True)


_RUNNERS = {
    SimplifyMethod.ONNXSIM: _run_onnxsim,
    SimplifyMethod.ONNXSLIM: _run_onnxslim,
    SimplifyMethod.ORT: _run_ort,
}


def _parity_feeds(model: onnx.ModelProto, config: SimplifyConfig) -> tuple[list[dict], str]:
    return parity_feeds(model, config.sample_data, config.input_shapes)


def _choose(candidates: list[Candidate], before: int, before_bytes: int) -> tuple[Candidate, int, int] | None:
    """The usable result with the fewest nodes among those no more than MAX_GROWTH larger than the
    smallest file (the input's included), then the smallest file, with its node count and size; None
    when none beats the input."""
    usable = [(c, c.nodes, c.bytes) for c in candidates if c.usable and c.nodes is not None and c.bytes is not None]
    smallest = min([before_bytes, *(size for _, _, size in usable)])
    limit = min(smallest, before_bytes) * MAX_GROWTH + _SLACK
    fitting = [u for u in usable if u[2] <= limit]
    best = min(fitting, key=lambda u: (u[1], u[2]), default=None)
    if best is None or (best[1], best[2]) >= (before, before_bytes):
        return None
    return best


def simplify_model(
    model: onnx.ModelProto, config: SimplifyConfig = SimplifyConfig(), feeds: list[dict] | None = None
) -> SimplifyResult:
    """Simplify an in-memory model; see the module docstring for how the result is chosen.

    ``feeds`` (input name -> array) replace the generated parity inputs, for models that need
    particular values (a sample rate, token ids within the vocabulary).
    """
    described = "the caller's inputs"
    if not feeds:
        feeds, described = _parity_feeds(model, config)
    methods = list(_RUNNERS) if config.method is SimplifyMethod.AUTO else [config.method]
    notes = []
    if config.method is SimplifyMethod.AUTO and not fits_in_protobuf(model):
        methods = [SimplifyMethod.ORT]
        notes.append("onnxsim and onnxslim skipped: the model is past 2 GB and they hold it as in-memory protobuf "
                     "copies (ask for one with --method)")
    size = serialized_size(model)
    candidates: list[Candidate] = []
    produced: dict[str, onnx.ModelProto] = {}
    with runnable(model) as reference:  # past 2 GB: one temporary file, shared by every step
        for method in methods:
            start = time.perf_counter()
            try:
                given = model
                if method is not SimplifyMethod.ORT:  # onnxruntime only reads it; the others may change it
                    given = onnx.ModelProto()
                    given.CopyFrom(model)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    result = _RUNNERS[method](given)
                with runnable(result) as candidate:
                    check_model(result)
                    parity = compare_models(reference, candidate, feeds, config.tolerance)
            except Exception as e:  # a simplifier that crashes is reported, never fatal
                first = first_line(e)
                candidates.append(
                    Candidate(method.value, None, None, time.perf_counter() - start,
                              error=f"{type(e).__name__}: {first}")
                )
                continue
            candidates.append(
                Candidate(method.value, _count_nodes(result), serialized_size(result), time.perf_counter() - start,
                          parity)
            )
            produced[method.value] = result
    before = _count_nodes(model)
    chosen = _choose(candidates, before, size)
    if chosen is None:
        return SimplifyResult(model=model, chosen="none (input kept)", nodes_before=before, nodes_after=before,
                              candidates=candidates, bytes_before=size, bytes_after=size, parity_inputs=described,
                              notes=notes)
    best, nodes, size_after = chosen
    return SimplifyResult(model=produced[best.method], chosen=best.method, nodes_before=before, nodes_after=nodes,
                          candidates=candidates, bytes_before=size, bytes_after=size_after, parity_inputs=described,
                          notes=notes)


def _check_runs(loaded: StageInput, config: SimplifyConfig) -> None:
    """The input (as normalized on load) must load and run in onnxruntime (InvalidModelError naming the
    file otherwise).

    Found by fuzzing: without this, a model onnxruntime rejects made every candidate fail its parity
    check, "input kept" was reported as success (exit 0), and onnxsim printed tracebacks on fd 2.
    """
    from onnxforge.targets.cpu import CpuTarget

    session = loaded.session(CpuTarget())
    session.run(None, _parity_feeds(loaded.model, config)[0][0])


def simplify(
    input_path: str | os.PathLike, output: str | os.PathLike, config: SimplifyConfig = SimplifyConfig()
) -> SimplifyResult:
    """Simplify the model at ``input_path`` and write the result to ``output`` (atomically)."""
    out = check_output_path(output, input_path, *paths_in(config))
    loaded = load_stage_input(input_path, "simplify", quantized=True, large=True)
    _check_runs(loaded, config)
    with contextlib.nullcontext() if loaded.notes else stored_at(loaded.model, input_path):
        result = simplify_model(loaded.model, config)
    save_model(result.model, out)
    result.path = out
    result.notes[:0] = loaded.notes
    return result
