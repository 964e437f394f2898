"""Merging: one deployable graph from a model and its pre- and post-processing, or from an ensemble.

    raw input ──[pre: image uint8 -> float, audio int16 -> float, or a tokenizer]──▶ network
              ──[post: softmax, top-k, argmax, mean-pool + L2]──▶ outputs a caller can use

where the network is one model, or N models that take the same inputs, averaged (``mean``) or
voting on their argmax (``vote``). Every block is a small ONNX model of its own, joined to the
network by ``onnx.compose`` (``merge_models``, ``add_prefix``, ``expand_out_dim``); the network is
never rewritten. The merged graph is checked against the same steps run one by one and, with
evaluation data, measured next to the network and each member.

    from onnxforge.pipeline.merge import ImagePre, MergeConfig, PostKind, merge
    merge("cnn.onnx", "cnn.deploy.onnx", MergeConfig(pre=ImagePre(dynamic_size=True), post=PostKind.ARGMAX))
"""

from onnxforge.pipeline.calibration import ImageLayout
from onnxforge.pipeline.merge.build import merge
from onnxforge.pipeline.merge.config import MergeConfig, MergeResult
from onnxforge.pipeline.merge.ensemble import EnsembleMode
from onnxforge.pipeline.merge.postprocess import PostKind
from onnxforge.pipeline.merge.preprocess import AudioPre, ImagePre, PixelLayout, ResizeMode
from onnxforge.pipeline.merge.tokenizer import TokenizerConfig

__all__ = [
    "AudioPre",
    "EnsembleMode",
    "ImageLayout",
    "ImagePre",
    "MergeConfig",
    "MergeResult",
    "PixelLayout",
    "PostKind",
    "ResizeMode",
    "TokenizerConfig",
    "merge",
]
