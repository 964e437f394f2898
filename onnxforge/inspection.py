"""``onnxforge inspect``: what a model takes and returns, its opset, ops, parameters and size."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxforge.model_cost import count_parameters
from onnxforge.model_io import TensorSpec, default_opset, input_specs, load_model, model_file_size, output_specs
from onnxforge.pipeline.codec import JsonResult

__all__ = ["ModelInfo", "inspect_model"]


@dataclass
class ModelInfo(JsonResult):
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int | None
    opsets: dict[str, int]
    producer: str
    ops: dict[str, int]
    nodes: int
    parameters: int
    bytes: int


def _walk(graph: onnx.GraphProto, ops: Counter) -> None:
    for node in graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _walk(attr.g, ops)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _walk(g, ops)


def inspect_model(path: str | os.PathLike) -> ModelInfo:
    model = load_model(path)
    ops: Counter = Counter()
    _walk(model.graph, ops)
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    return ModelInfo(
        path=Path(path),
        inputs=input_specs(model),
        outputs=output_specs(model),
        opset=default_opset(model),
        opsets={(e.domain or "ai.onnx"): int(e.version) for e in model.opset_import},
        producer=producer or "unknown",
        ops=dict(ops.most_common()),
        nodes=sum(ops.values()),
        parameters=count_parameters(model.graph),
        bytes=model_file_size(path),
    )
