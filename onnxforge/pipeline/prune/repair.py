"""Least-squares repair of the layers whose input channels were pruned (He et al. 2017, layer-wise,
in closed form).

Rule: for every layer whose input channels were removed, with X = its input in the *original*
model cut to the kept channels (im2col patches for a Conv) and Y = its output there (kept output
channels), solve the ridge problem ``min_W ||[X 1] W - Y||^2 + lam ||W - W0||^2`` where W0
is the sliced weight and bias and ``lam = a * trace(X'X) / d``:  ``W = (X'X + lam I)^-1 (X'Y + lam W0)``.
``a`` is picked from ``ridge * 10^k`` (k = 0..5) by the error on every 4th calibration sample, held
out of the fit (the errors reported are on those held-out rows); a refit that does not lower that
error is not applied. Token rows ([N, S, D] activations) at padding are left out of X'X, X'Y and the
errors (the feeds' attention mask, ``activations.token_mask``): the model never reads them, and on
sentences padded to their longest they were most of the rows the fit spent its capacity on.
Rows are sampled (``positions`` per sample) and X'X is accumulated in
batches of a few samples, so memory stays small. Every layer is fit to what its repaired upstream
layers aim to reproduce (the original activations at the kept channels), so all of them come from
one pass over the original model: refitting each on the pruned model as repaired so far took a pass
per layer (165 s per try on PP-OCRv4's detector at 480 x 640, against 17 s, for a cosine of 0.934
against 0.930; 99.8% against 99.3% on the digits CNN).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.pipeline.calibration import SampleSet
from onnxforge.pipeline.progress import Progress, counted, ignore
from onnxforge.pipeline.prune.activations import batches_of_values, real_rows, token_rows, value_batches
from onnxforge.pipeline.prune.channel_config import ChannelPruneConfig, PrunedModel
from onnxforge.pipeline.prune.graph import (
    checked_model,
    const_array,
    const_input,
    const_shape,
    drop_unused_initializers,
    input_name,
    new_initializer,
    prepared,
    value_name,
)

__all__ = ["repair_model"]


def _im2col_rows(x: np.ndarray, node: ir.Node, kernel: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """Patches [N*P, C*kh*kw] of a 2-D Conv's input at output positions ``rows`` ([N, P] flat indices)."""
    pads = list(node.attributes["pads"].value) if "pads" in node.attributes else [0, 0, 0, 0]
    strides = list(node.attributes["strides"].value) if "strides" in node.attributes else [1, 1]
    dilations = list(node.attributes["dilations"].value) if "dilations" in node.attributes else [1, 1]
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    windows = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, c, ho, wo = windows.shape[:4]
    flat = windows.reshape(n, c, ho * wo, kh * kw)
    picked = flat[np.arange(n)[:, None], :, rows]  # [N, P, C, kh*kw]
    return picked.reshape(n * rows.shape[1], c * kh * kw)


def _bias_add(node: ir.Node) -> tuple[ir.Node, int] | None:
    """(Add, its constant input) when a MatMul's only use adds a constant [out] bias: the layer x W + b,
    refit with its bias (the mean of what the pruned inputs carried goes there)."""
    if node.op_type != "MatMul" or node.outputs[0].is_graph_output():
        return None
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    index = 1 - uses[0].idx
    bias = add.inputs[index] if index < len(add.inputs) else None
    outputs = const_shape(node, 1)[-1]
    if bias is None or bias.const_value is None or tuple(bias.const_value.shape) != (outputs,):
        return None
    return add, index


def _target_name(node: ir.Node) -> str:
    """The value a refit layer reproduces: its output, with the bias when it is a separate Add."""
    found = _bias_add(node)
    return value_name((found[0] if found else node).outputs[0])


def _weight_matrix(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's weights as [d, out] (x @ W = y) and its bias [out] (None when absent)."""
    w = const_array(node, 1).astype(np.float64)
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias = const_array(node, 2).astype(np.float64).ravel() if has_bias else None
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T, bias
    if node.op_type == "Gemm":
        return (w.T if node.attributes.get("transB") and node.attributes["transB"].value else w), bias
    found = _bias_add(node)
    return w, (const_array(*found).astype(np.float64) if found else None)


def _set_weights(
    graph: ir.Graph, node: ir.Node, matrix: np.ndarray, bias: np.ndarray | None, counter: list[int]
) -> None:
    w_old = const_input(node, 1)
    if node.op_type == "Conv":
        w = matrix.T.reshape(const_shape(node, 1))
    elif node.op_type == "Gemm" and node.attributes.get("transB") and node.attributes["transB"].value:
        w = matrix.T
    else:
        w = matrix
    node.replace_input_with(1, new_initializer(graph, w_old, w.astype(np.float32), counter))
    found = _bias_add(node)
    if bias is not None and found is not None:
        add, index = found
        add.replace_input_with(index, new_initializer(graph, const_input(add, index), bias.astype(np.float32), counter))
    elif bias is not None:
        b_old = const_input(node, 2)
        new_b = bias.reshape(const_shape(node, 2)).astype(np.float32)
        node.replace_input_with(2, new_initializer(graph, b_old, new_b, counter))


def _repairable(node: ir.Node) -> str | None:
    """None when the layer can be refit, else why not."""
    if node.op_type == "Conv":
        if int(node.attributes["group"].value if "group" in node.attributes else 1) != 1:
            return "grouped Conv"
        if len(const_shape(node, 1)) != 4:
            return "only 2-D Convs are refit"
        auto_pad = node.attributes.get("auto_pad")
        if auto_pad is not None and auto_pad.value not in ("NOTSET", b"NOTSET"):
            return "auto_pad"
        return None
    if node.op_type == "Gemm":
        alpha = node.attributes["alpha"].value if "alpha" in node.attributes else 1.0
        beta = node.attributes["beta"].value if "beta" in node.attributes else 1.0
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        trans_b = bool(node.attributes.get("transB") and node.attributes["transB"].value)
        outputs = const_shape(node, 1)[0 if trans_b else 1]
        if alpha != 1.0 or (bias is not None and (beta != 1.0 or math.prod(const_shape(node, 2)) != outputs)):
            return "Gemm with alpha/beta != 1 or a broadcast bias"
        return None
    if node.op_type == "MatMul":
        return None
    return f"{node.op_type} is not refit"


def _rows_for(name: str, start: int, n: int, positions: int, total: int) -> np.ndarray:
    """[n, P] output positions sampled for samples start..start+n (deterministic per layer)."""
    p = min(positions, total)
    rng = np.random.default_rng(zlib.crc32(f"{name}:{start}".encode()))
    if p == total:
        return np.tile(np.arange(total), (n, 1))
    return np.stack([rng.choice(total, p, replace=False) for _ in range(n)])


def _layer_rows(node: ir.Node, x: np.ndarray, name: str, start: int, positions: int, out_spatial: tuple[int, ...],
                mask: np.ndarray | None):
    """(X rows [R, d], row selector to apply to the layer's output)."""
    if node.op_type == "Conv":
        total = int(np.prod(out_spatial))
        rows = _rows_for(name, start, x.shape[0], positions, total)
        kernel = const_shape(node, 1)[2:]
        return _im2col_rows(x, node, kernel, rows), rows
    return token_rows(x, mask), None


def _row_samples(x: np.ndarray, rows: int, samples: int, mask: np.ndarray | None) -> np.ndarray:
    """The sample (within the batch of ``samples``) each of the ``rows`` rows taken from ``x`` came from."""
    real = real_rows(x, mask)
    if real is None:
        return np.arange(rows) // max(rows // samples, 1)
    return (np.arange(len(real)) // max(len(real) // samples, 1))[real]


def _output_spatial(node: ir.Node, x: np.ndarray) -> tuple[int, ...]:
    """The output H, W of a 2-D Conv on ``x`` (what the rows are sampled from); () for other layers."""
    if node.op_type != "Conv":
        return ()
    pads = list(node.attributes["pads"].value) if "pads" in node.attributes else [0, 0, 0, 0]
    strides = list(node.attributes["strides"].value) if "strides" in node.attributes else [1, 1]
    dilations = list(node.attributes["dilations"].value) if "dilations" in node.attributes else [1, 1]
    kernel = const_shape(node, 1)[2:]
    return tuple(
        (x.shape[2 + i] + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i in range(2)
    )


def _output_rows(y: np.ndarray, op: str, rows: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray:
    if op == "Conv":
        n, c = y.shape[:2]
        flat = y.reshape(n, c, -1)
        return flat[np.arange(n)[:, None], :, rows].reshape(-1, c)  # [N, P, C] -> rows
    return token_rows(y, mask)


_BATCH = 4  # samples per pass: the layers' activations at 480 x 640 are hundreds of MB per sample


def _layer_statistics(
    reference: onnx.ModelProto,
    producers: dict[str, ir.Node],
    chunk: list[str],
    pruned: PrunedModel,
    calibration: SampleSet,
    config: ChannelPruneConfig,
    progress: Progress = ignore,
) -> dict[str, dict]:
    """Normal equations of each layer of ``chunk`` (held-out fold apart): X = the layer's input in the
    original model, cut to the kept channels; Y = its output, at the same sampled rows. Two passes
    over the calibration batches, each reported to ``progress``."""
    batches = value_batches(reference, calibration, _BATCH)
    y_rows: dict[str, list[np.ndarray]] = {name: [] for name in chunk}
    targets = {name: _target_name(producers[name]) for name in chunk}
    outputs = batches_of_values(reference, calibration, list(dict.fromkeys(targets.values())), _BATCH)
    for start, values, mask in counted(progress, "repair: layer outputs (pass 1/2)", outputs, batches):
        for name in chunk:
            node = producers[name]
            y = values[targets[name]]
            kept = pruned.kept_outputs.get(name)
            if kept is not None:
                y = np.take(y, kept, axis=1 if node.op_type in ("Conv", "Gemm") else -1)
            rows = _rows_for(name, start, len(y), config.positions, int(np.prod(y.shape[2:]))) \
                if node.op_type == "Conv" else None
            y_rows[name].append(_output_rows(y, node.op_type, rows, mask).astype(np.float64))
    stats: dict[str, dict] = {}
    for name in chunk:
        w0, b0 = _weight_matrix(producers[name])
        d = w0.shape[0] + (b0 is not None)
        stats[name] = {fold: [np.zeros((d, d)), np.zeros((d, w0.shape[1])), 0.0] for fold in ("fit", "check")}
    inputs = list(dict.fromkeys(input_name(producers[name]) for name in chunk))
    layer_inputs = batches_of_values(reference, calibration, inputs, _BATCH)
    for index, (start, values, mask) in enumerate(counted(progress, "repair: layer inputs (pass 2/2)", layer_inputs,
                                                    batches)):
        for name in chunk:
            node = producers[name]
            x = values[input_name(node)]
            kept_inputs = pruned.kept_outputs.get(input_name(node))
            if kept_inputs is not None:
                x = np.take(x, kept_inputs, axis=1 if node.op_type in ("Conv", "Gemm") else -1)
            yr = y_rows[name][index]
            xr, _ = _layer_rows(node, x, name, start, config.positions, _output_spatial(node, x), mask)
            batch_mask = mask if node.op_type != "Conv" else None
            samples = batch_mask.shape[0] if batch_mask is not None else len(x)
            sample = start + _row_samples(x, len(xr), samples, batch_mask)
            xr = xr.astype(np.float64)
            if _weight_matrix(node)[1] is not None:
                xr = np.hstack([xr, np.ones((len(xr), 1))])
            for fold, chosen in (("fit", sample % 4 != 3), ("check", sample % 4 == 3)):
                stats[name][fold][0] += xr[chosen].T @ xr[chosen]
                stats[name][fold][1] += xr[chosen].T @ yr[chosen]
                stats[name][fold][2] += float((yr[chosen] ** 2).sum())
    return stats


def _refit(graph: ir.Graph, node: ir.Node, stats: dict, config: ChannelPruneConfig, counter: list[int]) -> dict:
    """Solve the layer's ridge problem from its normal equations; apply it when it lowers the held-out error."""
    w0, b0 = _weight_matrix(node)
    w0_full = np.vstack([w0, b0[None, :]]) if b0 is not None else w0
    d = w0_full.shape[0]
    gram = stats["fit"][0] + stats["check"][0]
    cross = stats["fit"][1] + stats["check"][1]
    if stats["fit"][2] + stats["check"][2] == 0.0:
        return {"skipped": "no calibration rows"}
    check = stats["check"] if stats["check"][2] > 0 else [gram, cross, stats["fit"][2]]

    def rel_error(w: np.ndarray, held: list = check) -> float:
        # ||XW - Y||^2 = tr(W'GW) - 2 tr(W'C) + ||Y||^2, on the held-out rows
        g, c, y_sq = held
        return float((np.sum(w * (g @ w)) - 2 * np.sum(w * c) + y_sq) / y_sq)

    def solve(g: np.ndarray, c: np.ndarray, strength: float) -> np.ndarray:
        regularizer = strength * np.trace(g) / d * np.eye(d)
        if b0 is not None:
            regularizer[-1, -1] = 0.0  # the bias is not shrunk
        try:
            return np.linalg.solve(g + regularizer + 1e-12 * np.eye(d), c + regularizer @ w0_full)
        except np.linalg.LinAlgError:
            return np.linalg.lstsq(g + regularizer, c + regularizer @ w0_full, rcond=None)[0]

    strengths = [config.ridge * 10.0**k for k in range(6)] if config.ridge > 0 else [0.0]
    if stats["check"][2] > 0 and len(strengths) > 1:
        strength = min(strengths, key=lambda a: rel_error(solve(stats["fit"][0], stats["fit"][1], a)))
        before, after = rel_error(w0_full), rel_error(solve(stats["fit"][0], stats["fit"][1], strength))
    else:
        strength = strengths[0]
        before, after = rel_error(w0_full), rel_error(solve(gram, cross, strength))
    if not after < before:
        return {"before": before, "after": before, "kept_original": True}
    solution = solve(gram, cross, strength)  # refit on all rows with the chosen ridge
    _set_weights(graph, node, solution[: w0.shape[0]], solution[-1] if b0 is not None else None, counter)
    return {"before": before, "after": after, "ridge": strength}


def repair_model(
    original: onnx.ModelProto, pruned: PrunedModel, calibration: SampleSet, config: ChannelPruneConfig,
    progress: Progress = ignore,
) -> tuple[onnx.ModelProto, dict[str, dict]]:
    """Refit each layer whose inputs shrank so its output matches ``original``'s; returns (model, errors).

    ``errors[layer]`` holds the relative squared output error on the sampled calibration rows before
    and after the refit (``{"before": e0, "after": e1}``), or ``{"skipped": reason}``.
    """
    model_ir = prepared(pruned.model)
    graph = model_ir.graph
    producers = {name: node for node in graph if node.outputs and (name := node.outputs[0].name)}
    errors: dict[str, dict] = {}
    targets = [name for name in pruned.repair_layers if name in producers]
    reasons = {name: _repairable(producers[name]) for name in targets}
    errors.update({name: {"skipped": reason} for name, reason in reasons.items() if reason})
    targets = [name for name in targets if not reasons[name]]
    if not targets:  # no layer's inputs shrank (or none can be refit): nothing to ask onnxruntime for
        return pruned.model, errors
    reference = onnx.shape_inference.infer_shapes(original)
    counter = [0]
    stats = _layer_statistics(reference, producers, targets, pruned, calibration, config, progress)
    for name in counted(progress, "repair: least-squares refit", targets, len(targets)):
        errors[name] = _refit(graph, producers[name], stats[name], config, counter)
    drop_unused_initializers(graph)
    return checked_model(model_ir, "prune-channels: the least-squares repair produced an invalid model"), errors
