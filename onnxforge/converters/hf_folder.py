"""A Hugging Face model folder (what ``save_pretrained`` writes: ``config.json`` and weights in
``model.safetensors`` or ``pytorch_model.bin``, or their sharded ``*.index.json``) as an export source.

The task says which head to build and which outputs the graph has: it is read from ``config.json``'s
``architectures`` (``BertModel`` -> feature-extraction, ``*ForSequenceClassification`` ->
text-classification, ...) unless ``--task`` names it. The graph inputs are the ones forward() takes of
``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, dims ``batch`` and ``sequence``);
a recipe's ``inputs:`` (or ``--input-shape``/``--dynamic``) overrides an input's shape, dtype or
dynamic dims. The model itself goes to the torch exporter (``torch_export``): optimum-onnx, the
field's exporter, pins transformers < 4.58 and cannot be installed beside transformers 5.

Weights are never unpickled: safetensors files are read as tensors, and transformers reads a
``pytorch_model.bin`` with ``torch.load(weights_only=True)``; ``trust_remote_code`` stays off, so no
code from the folder runs.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onnxforge.converters.config import ExportConfig, HfTask
from onnxforge.errors import ExportError, UsageError

__all__ = ["HfExportPlan", "HfModel", "hf_note", "infer_task", "load_hf_folder", "plan_hf_export"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # in the order forward() takes them
_EXAMPLE_SHAPE = (2, 16)  # batch 2: torch.export specializes a batch of 1


@dataclass(frozen=True)
class _TaskHead:
    suffix: str  # how an architecture for this task ends: BertForSequenceClassification
    auto_class: str  # the transformers Auto class that builds it
    outputs: tuple[str, ...]  # the ModelOutput fields the graph returns, in order


_HEADS: dict[HfTask, _TaskHead] = {
    HfTask.FEATURE_EXTRACTION: _TaskHead("Model", "AutoModel", ("last_hidden_state",)),
    HfTask.TEXT_CLASSIFICATION: _TaskHead("ForSequenceClassification", "AutoModelForSequenceClassification",
                                          ("logits",)),
    HfTask.TOKEN_CLASSIFICATION: _TaskHead("ForTokenClassification", "AutoModelForTokenClassification", ("logits",)),
    HfTask.QUESTION_ANSWERING: _TaskHead("ForQuestionAnswering", "AutoModelForQuestionAnswering",
                                         ("start_logits", "end_logits")),
    HfTask.FILL_MASK: _TaskHead("ForMaskedLM", "AutoModelForMaskedLM", ("logits",)),
}
_TASK_LIST = ", ".join(t.value for t in HfTask)


def infer_task(architectures: Sequence[str]) -> HfTask | None:
    """The task of the first architecture named: ``*ForSequenceClassification`` -> text-classification,
    a bare ``*Model`` -> feature-extraction; None when no architecture is one of ours."""
    for name in architectures:
        for task, head in _HEADS.items():
            if task is HfTask.FEATURE_EXTRACTION:
                if name.endswith("Model") and "For" not in name:
                    return task
            elif name.endswith(head.suffix):
                return task
    return None


class _TaskOutputs(torch.nn.Module):
    """The transformers model called with named text inputs, returning the task's outputs as a tuple:
    the exporter and the parity check both call this, so they see the same tensors."""

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        extra = {k: v for k, v in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids))
                 if v is not None}
        result = self.model(input_ids=input_ids, **extra, return_dict=True)
        return tuple(result[name] for name in self.outputs)


@dataclass
class HfModel:
    """A loaded folder: the model wrapped to return its task's outputs, and what it was read as."""

    module: _TaskOutputs
    task: HfTask
    architecture: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    vocab_size: int
    type_vocab_size: int


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{folder}: a model folder needs a config.json (a Hugging Face save_pretrained folder)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{config_path}: not readable JSON ({type(e).__name__})") from e
    if not isinstance(config, dict):
        raise ExportError(f"{config_path}: expected a JSON object")
    return config


def load_hf_folder(folder: str | os.PathLike, task: HfTask | None = None) -> HfModel:
    """Check and load a save_pretrained folder for ``task`` (None: from config.json's architectures).

    Raises ExportError (exit 2) naming the folder when config.json or the weights are missing or
    unreadable, and UsageError when the task cannot be inferred.
    """
    folder = Path(folder)
    config = _read_config(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ExportError(f"{folder}: no weights (model.safetensors or pytorch_model.bin) beside config.json")
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if task is None:
        task = infer_task(architectures)
        if task is None:
            named = f"architectures {', '.join(architectures)}" if architectures else "no architectures"
            raise UsageError(f"{folder}: config.json names {named}; cannot tell the task",
                             hint=f"pass --task (one of {_TASK_LIST})")
    head = _HEADS[task]
    try:
        import transformers
    except ImportError as e:
        raise ExportError(f"{folder}: exporting a Hugging Face folder needs transformers",
                          hint="pip install 'onnxforge[transformers]'") from e
    auto = getattr(transformers, head.auto_class)
    use_safetensors = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar is noise in a CLI
    try:
        model = auto.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                     use_safetensors=use_safetensors)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
        raise ExportError(f"{folder}: transformers cannot load it as {task.value}: {type(e).__name__}: {first}",
                          hint=f"check --task (one of {_TASK_LIST})") from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model = model.float().eval()
    takes = set(inspect.signature(model.forward).parameters)
    input_names = tuple(n for n in TEXT_INPUTS if n in takes)
    if "input_ids" not in input_names:
        raise ExportError(f"{folder}: {type(model).__name__}.forward takes no input_ids; only text models export")
    model_config = model.config
    return HfModel(
        module=_TaskOutputs(model, head.outputs),
        task=task,
        architecture=type(model).__name__,
        input_names=input_names,
        output_names=head.outputs,
        vocab_size=int(getattr(model_config, "vocab_size", 100) or 100),
        type_vocab_size=int(getattr(model_config, "type_vocab_size", 1) or 1),
    )


@dataclass(frozen=True)
class HfExportPlan:
    """What the torch exporter is given: the config with the inputs' dynamic dims settled, example inputs
    (a padded mask, ids inside the vocabulary) and the graph's output names."""

    config: ExportConfig
    examples: dict[str, torch.Tensor]
    output_names: tuple[str, ...]


def _example(name: str, shape: tuple[int, ...], dtype: np.dtype, model: HfModel, rng: np.random.Generator) -> Any:
    if name == "attention_mask":
        mask = np.ones(shape, dtype=dtype)
        if len(shape) == 2 and shape[0] > 1 and shape[1] > 2:
            mask[1, shape[1] // 2:] = 0  # a padded row, so the parity check runs the masked path too
        return torch.from_numpy(mask)
    high = model.vocab_size if name == "input_ids" else model.type_vocab_size
    return torch.from_numpy(rng.integers(0, max(high, 1), size=shape).astype(dtype))


def plan_hf_export(model: HfModel, config: ExportConfig) -> HfExportPlan:
    """Settle the inputs: each of the model's text inputs gets its shape, dtype and dynamic dims from
    ``config`` when given there (a recipe's ``inputs:``, ``--input-shape``, ``--dynamic``), else
    2x16 int64 with dims ``batch`` and ``sequence``. A shape or dims given for one input hold for the
    inputs not named (they share batch and sequence); a dtype holds for its input only."""
    unknown = [n for n in (*config.input_shapes, *config.input_dtypes, *config.dynamic_axes)
               if n not in model.input_names]
    if unknown:
        raise UsageError(f"input {unknown[0]!r} is not an input of {model.architecture} "
                         f"(it takes {', '.join(model.input_names)})")
    # the text inputs share batch and sequence: one named input's shape or dims are the others' too
    given_shape = next(iter(config.input_shapes.values()), None)
    given_dims = next(iter(config.dynamic_axes.values()), None)
    rng = np.random.default_rng(0)
    examples: dict[str, torch.Tensor] = {}
    axes: dict[str, dict[int, str]] = {}
    for name in model.input_names:
        dims = dict(config.dynamic_axes.get(name, given_dims or {0: "batch", 1: "sequence"}))
        if config.dynamic_batch:
            dims[0] = "batch"
        shape = list(config.input_shapes.get(name, given_shape or _EXAMPLE_SHAPE))
        for axis in dims:
            if axis >= len(shape):
                raise UsageError(f"input {name!r}: dynamic axis {axis} is past its rank {len(shape)}")
            if shape[axis] == 1:
                shape[axis] = 2  # torch.export specializes a size of 1; any other size stays symbolic
        dtype = np.dtype(config.input_dtypes.get(name, np.int64))
        if dtype.kind not in "iu":
            raise UsageError(f"input {name!r}: dtype {dtype} given; token inputs are integers (int64 or int32)")
        examples[name] = _example(name, tuple(shape), dtype, model, rng)
        axes[name] = dims
    settled = replace(config, input_shapes={}, input_dtypes={}, dynamic_axes=axes, dynamic_batch=False)
    return HfExportPlan(settled, examples, model.output_names)


def hf_note(model: HfModel, inferred: bool) -> str:
    """What the export read the folder as, for the result's notes."""
    how = "from config.json's architectures" if inferred else "as given"
    return (f"Hugging Face folder: {model.architecture}, task {model.task.value} ({how}); "
            f"inputs {', '.join(model.input_names)}")
