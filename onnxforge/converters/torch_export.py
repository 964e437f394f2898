"""PyTorch -> ONNX. The dynamo exporter first (``torch.onnx.export(dynamo=True)``), the TorchScript
exporter when dynamo fails (unless one is asked for), then a parity check against PyTorch itself.

Traps handled here (measured with torch 2.13): dynamo writes weights to ``<name>.onnx.data``
unless ``external_data=False`` (we keep one file below 1.8 GB); dynamo asked for opset 17 yields
18; a dynamic batch needs an example batch of at least 2, or torch.export specializes it to 1.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxforge.converters.config import Exporter, ExportConfig
from onnxforge.errors import ExportError, UsageError

__all__ = ["export_torch", "torch_input_names", "run_torch"]

_DYNAMO_MIN_OPSET = 18
_EXTERNAL_DATA_BYTES = 1_800_000_000


def torch_input_names(model: Any) -> list[str]:
    """Names of forward()'s tensor parameters (``self`` and ``*args/**kwargs`` excluded)."""
    if isinstance(model, torch.jit.ScriptModule):
        schema = model.forward.schema
        return [a.name for a in schema.arguments if a.name != "self"]
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    params = inspect.signature(forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(value))


def _example_inputs(model: Any, config: ExportConfig, source_example: Any) -> dict[str, torch.Tensor]:
    names = torch_input_names(model)
    if source_example is not None and not config.input_shapes:
        if isinstance(source_example, Mapping):
            examples = {k: _to_tensor(v) for k, v in source_example.items()}
        else:
            values = source_example if isinstance(source_example, (tuple, list)) else (source_example,)
            examples = {name: _to_tensor(v) for name, v in zip(names, values)}
        if config.dynamic_batch:
            # torch.export specializes a batch of 1; any other size stays symbolic
            examples = {k: torch.cat([v, v]) if v.ndim and v.shape[0] == 1 else v for k, v in examples.items()}
        return examples
    if not config.input_shapes:
        raise UsageError(
            "PyTorch export needs example input shapes",
            hint=f"pass --input-shape for each input of forward(): {', '.join(names) or '(none found)'}"
            + (f", e.g. --input-shape {names[0]}=1x3x224x224" if names else ""),
        )
    unknown = [n for n in config.input_shapes if n not in names]
    if unknown:
        raise UsageError(
            f"--input-shape names {unknown[0]!r}, but forward() takes: {', '.join(names)}"
        )
    missing = [n for n in names if n not in config.input_shapes]
    if missing and len(config.input_shapes) < len(names):
        # Trailing parameters with defaults may be omitted; required ones may not.
        sig = inspect.signature(model.forward) if hasattr(model, "forward") else None
        required = [
            n for n in missing
            if sig is None or sig.parameters.get(n) is None or sig.parameters[n].default is inspect.Parameter.empty
        ]
        if required:
            raise UsageError(f"forward() input {required[0]!r} has no --input-shape")
    generator = torch.Generator().manual_seed(0)
    examples = {}
    for name in names:
        if name not in config.input_shapes:
            continue
        shape = list(config.input_shapes[name])
        if config.dynamic_batch and shape and shape[0] == 1:
            shape[0] = 2  # torch.export specializes a batch of 1; any other size stays symbolic
        dtype = np.dtype(config.input_dtypes.get(name, np.float32))
        if dtype.kind == "f":
            examples[name] = torch.randn(shape, generator=generator).to(getattr(torch, dtype.name))
        elif dtype.kind == "b":
            examples[name] = torch.ones(shape, dtype=torch.bool)
        elif "mask" in name.lower():
            examples[name] = torch.ones(shape, dtype=getattr(torch, dtype.name))
        else:
            examples[name] = torch.randint(0, 100, shape, generator=generator).to(getattr(torch, dtype.name))
    return examples


def _flatten_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten_outputs(v)]
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        return _flatten_outputs(value.to_tuple())
    return []


def run_torch(model: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run the PyTorch model on numpy feeds (by input name) and return flat numpy outputs."""
    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    return [t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy() for t in _flatten_outputs(out)]


def _dynamic_axes(config: ExportConfig, input_names: list[str], output_names: list[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    if config.dynamic_batch:
        for name in input_names + output_names:
            axes.setdefault(name, {})[0] = "batch"
    for name, dims in config.dynamic_axes.items():
        if name not in input_names:
            raise UsageError(f"--dynamic names {name!r}, which is not a model input ({', '.join(input_names)})")
        axes.setdefault(name, {}).update(dims)
    return axes


def _export_dynamo(model, examples, path, opset, input_names, output_names, axes, external):
    dynamic_shapes = None
    if axes:
        dims: dict[str, torch.export.Dim] = {}
        dynamic_shapes = {
            name: {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.get(name, {}).items()}
            or None
            for name in input_names
        }
    torch.onnx.export(
        model,
        args=(),
        kwargs=examples,
        f=str(path),
        dynamo=True,
        external_data=external,
        opset_version=max(opset or _DYNAMO_MIN_OPSET, _DYNAMO_MIN_OPSET),
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        optimize=True,
    )


def _export_torchscript(model, examples, path, opset, input_names, output_names, axes):
    torch.onnx.export(
        model,
        args=tuple(examples.values()),
        f=str(path),
        dynamo=False,
        opset_version=opset or 17,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=axes or None,
        do_constant_folding=True,
    )


def _quiet():
    """Silence the exporters' progress prints and warnings; they are noise in a CLI."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo"):
        logger = logging.getLogger(name)
        previous = logger.level
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, previous)
    return stack


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "#")):
            return f"{type(error).__name__}: {line[:240]}"
    return type(error).__name__


def export_torch(
    model: Any, config: ExportConfig, source_example: Any = None
) -> tuple[onnx.ModelProto, str, str | None, dict[str, torch.Tensor], list[str]]:
    """Export to an in-memory ModelProto. Returns (model, exporter used, why dynamo failed, examples, output names)."""
    if isinstance(model, torch.nn.Module):
        model = model.eval()
    examples = _example_inputs(model, config, source_example)
    input_names = list(examples)
    try:
        with torch.inference_mode():
            reference = model(**examples)
    except Exception as e:
        shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in examples.items())
        raise ExportError(f"the model's forward failed on inputs {shapes}: {_first_line(e)}") from e
    n_outputs = len(_flatten_outputs(reference))
    if n_outputs == 0:
        raise ExportError("the model's forward returned no tensors")
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    axes = _dynamic_axes(config, input_names, output_names)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) if hasattr(model, "parameters") else 0
    external = param_bytes > _EXTERNAL_DATA_BYTES

    order = {
        Exporter.AUTO: [Exporter.DYNAMO, Exporter.TORCHSCRIPT],
        Exporter.DYNAMO: [Exporter.DYNAMO],
        Exporter.TORCHSCRIPT: [Exporter.TORCHSCRIPT],
    }[config.exporter]
    if isinstance(model, torch.jit.ScriptModule) and config.exporter is Exporter.AUTO:
        order = [Exporter.TORCHSCRIPT]  # dynamo cannot trace a ScriptModule
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="onnxforge-export-") as tmp:
        for exporter in order:
            path = Path(tmp) / f"{exporter.value}.onnx"
            try:
                with _quiet():
                    if exporter is Exporter.DYNAMO:
                        _export_dynamo(model, examples, path, config.opset, input_names, output_names, axes, external)
                    else:
                        _export_torchscript(model, examples, path, config.opset, input_names, output_names, axes)
                proto = onnx.load(str(path), load_external_data=True)
            except Exception as e:
                failures.append(f"{exporter.value}: {_first_line(e)}")
                continue
            fallback = failures[0] if failures else None
            return proto, exporter.value, fallback, examples, output_names
    raise ExportError("export failed with every exporter tried: " + "; ".join(failures))
