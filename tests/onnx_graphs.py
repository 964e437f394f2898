"""Tiny ONNX graphs written as text for graph-rewrite tests (imported by tests; pytest puts tests/ on the path)."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx


def model_from_text(body: str, weights: dict[str, np.ndarray], inputs: str, outputs: str) -> onnx.ModelProto:
    """An opset-18 model from ONNX text ``body`` with ``weights`` as initializers; fully checked."""
    text = textwrap.dedent(
        f"""
        <ir_version: 8, opset_import: ["" : 18]>
        g ({inputs}) => ({outputs}) {{
        {textwrap.indent(textwrap.dedent(body).strip(), "    ")}
        }}
        """
    )
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model
