"""Export configuration and result, shared by every converter."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.model_io import TensorSpec
from onnxforge.parity import ParityReport, Tolerance
from onnxforge.pipeline.codec import JsonResult, option

__all__ = ["ExportConfig", "ExportResult", "Exporter", "HfTask"]


_DEFAULT_TOLERANCE = Tolerance()  # frozen, so one instance serves every config


class Exporter(enum.Enum):
    AUTO = "auto"  # dynamo first, TorchScript when dynamo fails
    DYNAMO = "dynamo"
    TORCHSCRIPT = "torchscript"


class HfTask(enum.Enum):
    """What a Hugging Face folder is exported for: which head is built and which outputs the graph has."""

    FEATURE_EXTRACTION = "feature-extraction"  # BertModel: last_hidden_state
    TEXT_CLASSIFICATION = "text-classification"  # *ForSequenceClassification: logits
    TOKEN_CLASSIFICATION = "token-classification"  # *ForTokenClassification: logits
    QUESTION_ANSWERING = "question-answering"  # *ForQuestionAnswering: start_logits, end_logits
    FILL_MASK = "fill-mask"  # *ForMaskedLM: logits


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """How to export.

    input_shapes / input_dtypes: per input name (dtype defaults to float32).
    dynamic_batch: axis 0 of every input and output becomes the dim ``batch``.
    dynamic_axes: extra dynamic dims, ``{"input_ids": {1: "sequence"}}``.
    sample_inputs: an .npz whose arrays (keyed by input name) are used for the parity check.
    """

    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_dtypes: Mapping[str, np.dtype] = field(default_factory=dict)
    dynamic_batch: bool = option(False, help="make axis 0 of every input and output dynamic ('batch')")
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    opset: int | None = option(None, help="target opset (dynamo produces at least 18)")
    exporter: Exporter = option(Exporter.AUTO, help="which torch exporter (auto: dynamo, falling back to TorchScript)")
    tolerance: Tolerance = _DEFAULT_TOLERANCE
    sample_inputs: Path | None = option(None, help=".npz inputs for the parity check")
    check_parity: bool = option(True, help="run the exported graph against the framework model")
    task: HfTask | None = option(
        None, help="a Hugging Face folder's task (default: from config.json's architectures)")
    # file.py:callable sources run in a child process stopped after this long; it decides whether the export
    # finishes, not what it writes, so it is saved but not part of the cache key
    timeout_s: float = option(
        1800.0, help="file.py:callable sources run in a child process; stop it after this many seconds", key=False)


@dataclass
class ExportResult(JsonResult):
    path: Path
    source_kind: str
    exporter: str
    parity: ParityReport | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int | None
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    parity_inputs: list[str] = field(default_factory=list)  # the input shapes each parity run used
    unverified_note: Path | None = None  # <out>.unverified.json, written when parity failed
    # the input shapes the export traced with, batch 1 where the batch is dynamic: a run times the exported
    # model at these when its recipe gives no shapes (a Hugging Face folder's sequence is dynamic)
    traced_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return self.parity is not None and self.parity.ok

    def json_extra(self) -> dict[str, Any]:
        return {"verified": self.verified}
