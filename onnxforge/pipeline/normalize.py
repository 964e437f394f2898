"""What every model-changing stage does to its input before any work: refuse what it cannot rewrite,
and normalize what other tools wrote in older or looser ways, saying what changed.

Refused (exit 2, one line, before any work):

- an already-quantized graph (QuantizeLinear/DequantizeLinear, QLinear*, MatMulInteger, ConvInteger,
  DynamicQuantizeLinear, MatMulNBits, ...), by the stages that rewrite float weights: quantized
  again it failed deep inside onnxruntime's quantizer, and pruning or fp16 would rewrite its scales;
- a model past protobuf's 2 GB, by the stages that do not take one yet (``large=False``);
- two nodes writing the same value (not single static assignment: not ONNX) — onnx's checker
  refuses it when the file is loaded.

Normalized (the ``notes`` say so):

- an opset older than ``MIN_OPSET`` (7: the oldest onnxruntime runs) is upgraded with onnx's version
  converter, then checked by onnx's checker and by loading it in onnxruntime; when it cannot be,
  exit 2. It runs first: the converter needs an IR-3 model's initializers among its inputs.
- initializers listed as graph inputs (IR < 4 required it; some exporters still do it) are weights:
  they leave ``graph.input`` (nothing here feeds them, and ``input_specs`` never offers them), IR
  is raised to 4 where it was lower. Left there, a rewrite that renames a weight kept the old one
  alive as an input (channel pruning reported 1,397 -> 2,093 parameters) or wrote an IR-3 file with
  an initializer missing from its inputs, which the checker refuses.
- duplicate node names (onnxruntime refuses "two nodes with same node name"; some exporters and
  merges write them) are made unique: the first keeps its name, later ones get ``_1``, ``_2``, ...
  onnx-ir's NameFixPass is not used: it also names every unnamed value, which turns an omitted
  optional output ("" in LSTM's or Split's outputs) into one that is computed. Empty node names are
  left alone: onnxruntime accepts any number of them.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxforge.errors import UsageError, first_line
from onnxforge.model_io import default_opset, fits_in_protobuf, load_model, model_file_size
from onnxforge.targets.base import Target

__all__ = ["MIN_OPSET", "QUANTIZED_OPS", "StageInput", "load_stage_input", "normalize", "quantized_ops"]

MIN_OPSET = 7
_CPP_WHERE = re.compile(r"^\S+\.cc:\d+: \w+: ")  # the converter's "/project/onnx/.../helper.cc:68: assertNotParams: "

QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "MatMulInteger", "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention",
    "DynamicQuantizeLSTM", "MatMulBnb4", "GatherBlockQuantized", "QOrderedMatMul",
})


@dataclass
class StageInput:
    """A stage's input file, its model after :func:`normalize`, and one note per change made to it."""

    path: Path
    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)

    def session(self, target: Target) -> ort.InferenceSession:
        """The model in a session on ``target``: from the file when nothing was normalized, else from
        the normalized model; errors name the file either way."""
        return target.session(self.model if self.notes else self.path, name=str(self.path))


def load_stage_input(
    path: str | os.PathLike, stage: str, *, quantized: bool = False, large: bool = False
) -> StageInput:
    """Load ``path`` for ``stage`` (its name in messages), refuse what it cannot take, and normalize it.

    ``quantized``: the stage takes already-quantized graphs (else UsageError, exit 2, naming the ops);
    ``large``: the stage takes models past protobuf's 2 GB (else UsageError before loading them).
    """
    path = Path(path)
    if not large and path.is_file() and not fits_in_protobuf(path):
        raise UsageError(
            f"{path}: {model_file_size(path) / 1e9:.1f} GB is past protobuf's 2 GB, and {stage} does not take models "
            "that large yet",
            hint="simplify, fp16 and profile take them (with external data)",
        )
    model = load_model(path)
    if not quantized:
        found = quantized_ops(model.graph)
        if found:
            raise UsageError(
                f"{path}: already quantized (it has {', '.join(found)} nodes); {stage} rewrites float models",
                hint=f"run {stage} on the float model it came from",
            )
    model, notes = normalize(model, path)
    return StageInput(path, model, notes)


def quantized_ops(graph: onnx.GraphProto) -> list[str]:
    """The quantized op types in ``graph`` and its subgraphs, sorted."""
    return sorted({n.op_type for n in _nodes(graph) if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")})


def normalize(model: onnx.ModelProto, path: str | os.PathLike = "the model") -> tuple[onnx.ModelProto, list[str]]:
    """(``model`` normalized as the module docstring says, notes). ``model`` is changed in place when
    only its inputs or names change; an opset upgrade returns a new model."""
    notes = []
    opset = default_opset(model)
    if opset is not None and opset < MIN_OPSET:
        model = _upgraded(model, opset, path)
        notes.append(f"upgraded opset {opset} -> {MIN_OPSET} (onnxruntime runs opset {MIN_OPSET} and later)")
    moved, ir_before = _initializers_out_of_inputs(model)
    if moved:
        raised = f", IR version {ir_before} -> {model.ir_version}" if model.ir_version != ir_before else ""
        notes.append(f"moved {moved} initializer{'s' * (moved != 1)} out of the graph inputs "
                     f"(weights, not fed){raised}")
    renamed = _rename_duplicate_nodes(model)
    if renamed:
        notes.append(f"renamed {renamed} duplicate node name{'s' * (renamed != 1)} (onnxruntime refuses duplicates)")
    return model, notes


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _nodes(sub)


def _upgraded(model: onnx.ModelProto, opset: int, path) -> onnx.ModelProto:
    from onnxforge.targets.cpu import CpuTarget

    try:
        upgraded = onnx.version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
        CpuTarget().session(upgraded)
    except Exception as e:  # the converter has no adapter for an op, or its result does not load
        raise UsageError(
            f"{path}: opset {opset} is older than onnxruntime runs ({MIN_OPSET}+), and onnx's version converter "
            f"could not upgrade it: {_CPP_WHERE.sub('', first_line(getattr(e, 'message', e), 200))}",
            hint=f"re-export the model at opset {MIN_OPSET} or later",
        ) from e
    return upgraded


def _initializers_out_of_inputs(model: onnx.ModelProto) -> tuple[int, int]:
    """(initializers removed from the graph inputs, the IR version before)."""
    ir_before = model.ir_version
    weights = {t.name for t in model.graph.initializer}
    kept = [vi for vi in model.graph.input if vi.name not in weights]
    moved = len(model.graph.input) - len(kept)
    if moved:
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)  # IR 4: initializers need not be inputs
    return moved, ir_before


def _rename_duplicate_nodes(model: onnx.ModelProto) -> int:
    """Give every repeated node name, in any (sub)graph, a ``_k`` suffix no node uses; the number renamed."""
    nodes = list(_nodes(model.graph))
    counts = Counter(n.name for n in nodes if n.name)
    if all(c == 1 for c in counts.values()):
        return 0
    used = set(counts)
    seen: set[str] = set()
    renamed = 0
    for node in nodes:
        if not node.name:
            continue
        if node.name not in seen:
            seen.add(node.name)
            continue
        k = 1
        while f"{node.name}_{k}" in used:
            k += 1
        node.name = f"{node.name}_{k}"
        used.add(node.name)
        renamed += 1
    return renamed
