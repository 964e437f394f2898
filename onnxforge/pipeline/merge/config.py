"""What a merge is asked to do (``MergeConfig``) and what it did (``MergeResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxforge.errors import MergeError
from onnxforge.model_io import TensorSpec
from onnxforge.parity import ParityReport, Tolerance
from onnxforge.pipeline.data_spec import DataSpec, set_data_fields
from onnxforge.pipeline.merge.ensemble import EnsembleMode
from onnxforge.pipeline.merge.postprocess import PostKind
from onnxforge.pipeline.merge.preprocess import AudioPre, ImagePre
from onnxforge.pipeline.merge.tokenizer import TokenizerConfig

__all__ = ["MergeConfig", "MergeResult"]


_DEFAULT_TOLERANCE = Tolerance()  # frozen: one shared default is safe


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """One deployable graph: ``pre`` (or ``tokenizer``) -> the model (or an ``ensemble`` of several) -> ``post``.

    ``post_output``: the model output post-processed (default: the first); ``top_k`` and ``softmax``
    shape ``topk``/``argmax``; ``mask_input`` is the attention mask ``mean-pool-l2`` weights tokens by.
    ``eval_data``: an .npz keyed by the model's input names (+ optional ``label``) on which the merged
    graph, the model and each ensemble member are measured. ``tolerance``: parity of the merged graph
    with the same steps run one by one (numpy pre/post, onnxruntime for the network).
    """

    pre: ImagePre | AudioPre | None = None
    tokenizer: TokenizerConfig | None = None
    post: PostKind = PostKind.NONE
    top_k: int = 5
    softmax: bool = True
    post_output: str | None = None
    mask_input: str = "attention_mask"
    ensemble: EnsembleMode = EnsembleMode.MEAN
    eval_data: DataSpec | None = None
    tolerance: Tolerance = _DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        set_data_fields(self, "eval_data")  # a str or Path from the Python API becomes a DataSpec
        if self.pre is not None and self.tokenizer is not None:
            raise MergeError("a merged graph has one pre-processing block: an image/audio one or a tokenizer, not both")
        if self.top_k < 1:
            raise MergeError(f"top_k {self.top_k}: must be at least 1")


@dataclass
class MergeResult:
    """The merged file, its interface, the parity of the merged graph with the separate steps, and,
    with evaluation data, the accuracy of the merged graph, of the model, and of each ensemble member."""

    path: Path
    models: list[str]
    blocks: list[str]  # what was joined, in order
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity: ParityReport
    parity_inputs: list[str]
    accuracy: dict[str, Any] | None = None  # {"merged", "network" or "members", "samples"}
    renamed: dict[str, str] = field(default_factory=dict)  # interface names prefixed to avoid a clash
    notes: list[str] = field(default_factory=list)
    unverified_note: Path | None = None

    @property
    def verified(self) -> bool:
        return self.parity.ok

    @property
    def metrics(self) -> dict[str, float]:
        """What the runner records for this stage when it cannot feed the merged graph itself."""
        merged = (self.accuracy or {}).get("merged")
        return {} if merged is None else {"accuracy": merged}

    def summary(self) -> str:
        parts = [" + ".join(self.blocks), self.parity.summary().split(":")[0]]
        merged = (self.accuracy or {}).get("merged")
        if merged is not None:
            parts.append(f"accuracy {merged:.2%}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "models": list(self.models),
            "blocks": list(self.blocks),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "parity": self.parity.to_json(),
            "parity_inputs": list(self.parity_inputs),
            "accuracy": self.accuracy,
            "metrics": self.metrics,
            "renamed": dict(self.renamed),
            "notes": list(self.notes),
            "verified": self.verified,
            "unverified_note": str(self.unverified_note) if self.unverified_note else None,
        }
