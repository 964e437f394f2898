"""Post-processing blocks appended to the network's output (``x``, class scores ``[N, C]`` or token
states ``[N, S, D]``):

- ``softmax``: ``p = exp(x - max x) / sum exp(x - max x)`` over the last axis -> ``probabilities``;
- ``topk``: the ``k`` largest of ``p`` (of ``x`` with ``softmax: false``) -> ``labels`` [N, k] (int64)
  and ``scores`` [N, k], best first, the lower index first among equals (ONNX TopK);
- ``argmax``: the same with k = 1, squeezed -> ``label`` [N] and ``score`` [N];
- ``mean-pool-l2``: ``e = sum_s m_s x_s / max(sum_s m_s, 1e-9)``, then ``e / max(||e||_2, 1e-12)``
  with ``m`` the attention mask -> ``embedding`` [N, D] (what sentence-transformers computes).

A network whose output already comes out of a Softmax node is not given a second one. Each block also
has its numpy ``reference``, run beside the merged graph by the parity check.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import MergeError
from onnxforge.model_io import TensorSpec, input_specs, output_specs
from onnxforge.pipeline.merge._compose import block_model, spec_info, value_info

__all__ = ["OUTPUT_NAMES", "PostKind", "PostPlan", "plan_postprocessing"]


class PostKind(enum.Enum):
    NONE = "none"
    SOFTMAX = "softmax"
    TOPK = "topk"
    ARGMAX = "argmax"
    MEAN_POOL_L2 = "mean-pool-l2"


# The merged graph's outputs per block, in order (prefixed only where the name is already taken).
OUTPUT_NAMES = {
    PostKind.SOFTMAX: ("probabilities",),
    PostKind.TOPK: ("labels", "scores"),
    PostKind.ARGMAX: ("label", "score"),
    PostKind.MEAN_POOL_L2: ("embedding",),
}


@dataclass(frozen=True)
class PostPlan:
    """A post-processing block resolved against the network's output (and mask input, for pooling)."""

    kind: PostKind
    network_output: TensorSpec
    top_k: int
    softmax: bool
    mask: TensorSpec | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        return OUTPUT_NAMES[self.kind]

    def block(self, like: onnx.ModelProto) -> onnx.ModelProto:
        """The block: inputs ``x`` (and ``mask``), outputs ``self.outputs``."""
        x = self.network_output
        dtype = x.dtype
        batch = x.shape[0] if x.shape else "batch"
        inputs = [spec_info(x, "x")]
        nodes, inits = [], []
        if self.kind is PostKind.MEAN_POOL_L2:
            if self.mask is None:  # plan_post always finds the mask for this kind
                raise MergeError("mean-pool-l2 needs the attention mask input")
            inputs.append(spec_info(self.mask, "mask"))
            inits += [numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
                      numpy_helper.from_array(np.array([1], np.int64), "token_axis"),
                      numpy_helper.from_array(np.array(1e-9, dtype), "count_floor"),
                      numpy_helper.from_array(np.array(1e-12, dtype), "norm_floor")]
            nodes += [
                helper.make_node("Unsqueeze", ["mask", "last_axis"], ["mask3"]),
                helper.make_node("Cast", ["mask3"], ["weights"], to=helper.np_dtype_to_tensor_dtype(dtype)),
                helper.make_node("Mul", ["x", "weights"], ["masked"]),
                helper.make_node("ReduceSum", ["masked", "token_axis"], ["summed"], keepdims=0),
                helper.make_node("ReduceSum", ["weights", "token_axis"], ["count"], keepdims=0),
                helper.make_node("Max", ["count", "count_floor"], ["count_safe"]),
                helper.make_node("Div", ["summed", "count_safe"], ["mean"]),
                helper.make_node("Mul", ["mean", "mean"], ["squares"]),
                helper.make_node("ReduceSum", ["squares", "last_axis"], ["square_sum"], keepdims=1),
                helper.make_node("Sqrt", ["square_sum"], ["norm"]),
                helper.make_node("Max", ["norm", "norm_floor"], ["norm_safe"]),
                helper.make_node("Div", ["mean", "norm_safe"], ["embedding"]),
            ]
            outputs = [value_info("embedding", dtype, [batch, x.shape[-1]])]
            return block_model("mean_pool_l2", nodes, inputs, outputs, like, initializers=inits)
        # Ours rather than onnxruntime-extensions' steps (benchmarks/merge_library.py, 2026-12-07): its
        # Softmax step is the same single op (equal outputs, 1.00x) and buys nothing but the library's
        # import at build time; its ArgMax step gives the label without the score (ours: TopK k=1, label
        # and score, 0.97x-1.00x in the noise); it has no top-k step.
        scores = "x"
        if self.softmax:
            name = "probabilities" if self.kind is PostKind.SOFTMAX else "p"
            nodes.append(helper.make_node("Softmax", ["x"], [name], axis=-1))
            scores = name
        if self.kind is PostKind.SOFTMAX:
            outputs = [spec_info(x, "probabilities")]
        elif self.kind is PostKind.TOPK:
            inits.append(numpy_helper.from_array(np.array([self.top_k], np.int64), "k"))
            nodes.append(helper.make_node("TopK", [scores, "k"], ["scores", "labels"], axis=-1, largest=1, sorted=1))
            outputs = [value_info("labels", TensorProto.INT64, [*x.shape[:-1], self.top_k]),
                       value_info("scores", dtype, [*x.shape[:-1], self.top_k])]
        else:  # ARGMAX
            inits += [numpy_helper.from_array(np.array([1], np.int64), "one"),
                      numpy_helper.from_array(np.array([-1], np.int64), "last_axis")]
            nodes += [helper.make_node("TopK", [scores, "one"], ["best_score", "best_label"], axis=-1, largest=1),
                      helper.make_node("Squeeze", ["best_label", "last_axis"], ["label"]),
                      helper.make_node("Squeeze", ["best_score", "last_axis"], ["score"])]
            outputs = [value_info("label", TensorProto.INT64, list(x.shape[:-1])),
                       value_info("score", dtype, list(x.shape[:-1]))]
        return block_model(self.kind.value, nodes, inputs, outputs, like, initializers=inits)

    def reference(self, x: np.ndarray, mask: np.ndarray | None = None) -> list[np.ndarray]:
        """The same block in numpy (float64 inside), outputs in ``self.outputs`` order."""
        dtype = self.network_output.dtype
        x64 = np.asarray(x, np.float64)
        if self.kind is PostKind.MEAN_POOL_L2:
            weights = np.asarray(mask, np.float64)[..., None]
            mean = (x64 * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
            norm = np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
            return [(mean / norm).astype(dtype)]
        p = x64
        if self.softmax:
            e = np.exp(x64 - x64.max(-1, keepdims=True))
            p = e / e.sum(-1, keepdims=True)
        if self.kind is PostKind.SOFTMAX:
            return [p.astype(dtype)]
        order = np.argsort(-p, axis=-1, kind="stable")[..., : self.top_k]
        best = np.take_along_axis(p, order, axis=-1).astype(dtype)
        if self.kind is PostKind.TOPK:
            return [order.astype(np.int64), best]
        return [order[..., 0].astype(np.int64), best[..., 0]]

    @staticmethod
    def labels(kind: PostKind, outputs: Mapping[str, np.ndarray], first_output: str) -> np.ndarray | None:
        """The predicted class per sample from the merged graph's outputs (None: not a classifier)."""
        if kind is PostKind.ARGMAX:
            return np.asarray(outputs["label"])
        if kind is PostKind.TOPK:
            return np.asarray(outputs["labels"])[..., 0]
        if kind is PostKind.MEAN_POOL_L2:
            return None
        scores = np.asarray(outputs["probabilities" if kind is PostKind.SOFTMAX else first_output])
        return scores.argmax(-1) if scores.ndim == 2 and scores.shape[1] > 1 else None


def _produced_by_softmax(network: onnx.ModelProto, name: str) -> bool:
    return any(name in node.output and node.op_type == "Softmax" for node in network.graph.node)


def plan_postprocessing(
    kind: PostKind,
    network: onnx.ModelProto,
    *,
    output: str | None,
    top_k: int,
    softmax: bool,
    mask_input: str,
    notes: list[str],
) -> PostPlan | None:
    """Resolve a post-processing block against ``network``; None for ``PostKind.NONE``."""
    if kind is PostKind.NONE:
        return None
    outputs = output_specs(network)
    if output is None:
        spec = outputs[0]
    else:
        found = [s for s in outputs if s.name == output]
        if not found:
            raise MergeError(f"{kind.value}: the model has no output {output!r}; its outputs are "
                             f"{', '.join(s.name for s in outputs)}")
        spec = found[0]
    if spec.dtype.kind != "f":
        raise MergeError(f"{kind.value} post-processing needs a float output; {spec.name!r} is {spec.dtype}")
    if kind is PostKind.MEAN_POOL_L2:
        if len(spec.shape) != 3:
            raise MergeError(f"mean-pool-l2 pools token states [batch, tokens, dim]; {spec.name!r} has shape "
                             f"{spec.shape_text()}")
        masks = [s for s in input_specs(network) if s.name == mask_input]
        if not masks:
            raise MergeError(f"mean-pool-l2 needs the attention mask; the model has no input {mask_input!r}",
                             hint="name the mask input: mask_input=NAME (--mask-input NAME)")
        return PostPlan(kind, spec, top_k, False, masks[0])
    if not spec.shape:
        raise MergeError(f"{kind.value} post-processing needs class scores; {spec.name!r} is a scalar")
    classes = spec.shape[-1]
    if kind is PostKind.TOPK and isinstance(classes, int) and top_k > classes:
        raise MergeError(f"top-k with k={top_k}: {spec.name!r} has only {classes} classes")
    if softmax and _produced_by_softmax(network, spec.name):
        notes.append(f"{spec.name!r} already comes out of a Softmax: not applied twice")
        softmax = False
    return PostPlan(kind, spec, top_k, softmax)
