"""PyTorch -> ONNX. The dynamo exporter first (``torch.onnx.export(dynamo=True)``), the TorchScript
exporter when dynamo fails (unless one is asked for), then a parity check against PyTorch itself.

A ``torch.export`` program (``.pt2``, an ExportedProgram) goes to the dynamo exporter only: its
dynamic dims were fixed when it was exported, and there is no module left to trace with TorchScript.

Traps handled here (measured with torch 2.13): dynamo writes weights to ``<name>.onnx.data``
unless ``external_data=False`` (we keep one file below 1.8 GB and ask for external data above, as
protobuf cannot hold 2 GB); dynamo asked for opset 17 yields 18; a dynamic batch needs an example
batch of at least 2, or torch.export specializes it to 1. The TorchScript exporter may bake a
sequence length into Reshape constants (nn.TransformerEncoder does): the parity check runs a
second length to catch it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxforge.converters._silence import silent_fds
from onnxforge.converters.config import ExportConfig, Exporter
from onnxforge.errors import ExportError, UsageError

__all__ = ["ProgramRunner", "export_program", "export_torch", "load_program", "run_torch", "torch_input_names"]

_DYNAMO_MIN_OPSET = 18
_EXTERNAL_DATA_BYTES = 1_800_000_000


def torch_input_names(model: Any) -> list[str]:
    """Names of forward()'s tensor parameters (``self`` and ``*args/**kwargs`` excluded)."""
    if isinstance(model, torch.jit.ScriptModule):
        schema = model.forward.schema  # type: ignore[attr-defined]  # a ScriptMethod; torch types it a Callable
        return [a.name for a in schema.arguments if a.name != "self"]
    params = _forward_parameters(model)
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _forward_parameters(model: Any) -> list[inspect.Parameter]:
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C-implemented callable: nothing to read
        return []


def takes_varargs(model: Any) -> bool:
    """Whether forward() is ``forward(self, *args)``-shaped: its inputs are passed by position.

    Those inputs have no names of their own; they are called ``input_0``, ``input_1``, ... after
    the named parameters (see :func:`_input_names_for`), and every call passes them positionally.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return False
    return any(p.kind is p.VAR_POSITIONAL for p in _forward_parameters(model))


def _input_names_for(model: Any, count: int) -> list[str]:
    """forward()'s named parameters, extended with ``input_K`` names for what ``*args`` takes."""
    names = torch_input_names(model)
    if takes_varargs(model):
        names += [f"input_{i}" for i in range(len(names), count)]
    return names


def call_torch(model: Any, feeds: Mapping[str, torch.Tensor]) -> Any:
    """Call the model with feeds keyed by input name: by keyword, or by position for ``*args``."""
    if takes_varargs(model):
        return model(*feeds.values())
    return model(**feeds)


def _to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(value))


def _example_inputs(model: Any, config: ExportConfig, source_example: Any) -> dict[str, torch.Tensor]:
    if source_example is not None and not config.input_shapes:
        if isinstance(source_example, Mapping):
            examples = {k: _to_tensor(v) for k, v in source_example.items()}
            if takes_varargs(model):
                # by position: forward's named parameters first, in its order, then the rest as given
                order = [n for n in torch_input_names(model) if n in examples]
                examples = {k: examples[k] for k in order + [k for k in examples if k not in order]}
        else:
            values = source_example if isinstance(source_example, (tuple, list)) else (source_example,)
            names = _input_names_for(model, len(values))
            if len(values) > len(names):
                raise UsageError(
                    f"the source gives {len(values)} example inputs, but forward() takes {len(names)}: "
                    + (", ".join(names) or "(none)")
                )
            examples = {name: _to_tensor(v) for name, v in zip(names, values, strict=False)}
        if config.dynamic_batch:
            # torch.export specializes a batch of 1; any other size stays symbolic
            examples = {k: torch.cat([v, v]) if v.ndim and v.shape[0] == 1 else v for k, v in examples.items()}
        return examples
    names = _input_names_for(model, len(config.input_shapes))
    if not config.input_shapes:
        if takes_varargs(model):
            hint = (
                "forward() takes *args: pass --input-shape for "
                + ", ".join([*names, f"input_{len(names)}", "..."])
                + " (what *args takes is named input_K, in order)"
            )
        else:
            hint = f"pass --input-shape for each input of forward(): {', '.join(names) or '(none found)'}"
            hint += f", e.g. --input-shape {names[0]}=1x3x224x224" if names else ""
        raise UsageError("PyTorch export needs example input shapes", hint=hint)
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
        out = call_torch(model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    return [
        t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy() for t in _flatten_outputs(out)
    ]


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


def _wants_external_data(model: Any) -> bool:
    """Weights past protobuf's 2 GB limit must be written as external data on purpose."""
    if isinstance(model, torch.export.ExportedProgram):
        tensors = list(model.state_dict.values()) + list(model.constants.values())
    elif hasattr(model, "parameters"):
        tensors = list(model.parameters()) + list(model.buffers())
    else:
        return False
    total = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total > _EXTERNAL_DATA_BYTES


def _export_dynamo(
    model: Any,
    examples: dict[str, torch.Tensor],
    path: Path,
    opset: int | None,
    input_names: list[str],
    output_names: list[str],
    axes: Mapping[str, Mapping[int, str]],
    external: bool,
) -> None:
    by_name: dict[str, Any] | None = None  # {input: {axis: Dim} or None}
    if axes:
        dims: dict[str, torch.export.Dim] = {}
        by_name = {
            name: {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.get(name, {}).items()}
            or None
            for name in input_names
        }
    args, kwargs = (tuple(examples.values()), None) if takes_varargs(model) else ((), examples)
    dynamic_shapes: dict[str, Any] | tuple[Any, ...] | None = by_name
    if by_name is not None and takes_varargs(model):
        # by position, like the inputs: the named parameters, then one entry for *args holding the rest
        specs = list(by_name.values())
        named = len(torch_input_names(model))
        dynamic_shapes = (*specs[:named], tuple(specs[named:]))
    torch.onnx.export(
        model,
        args=args,
        kwargs=kwargs,
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
        verbose=False,  # its graph dump on failure goes to fd 1 regardless; silent_fds() catches that
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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(error: BaseException) -> BaseException:
    """The dynamo exporter wraps the real reason (e.g. 'no decomposition for op X') in a generic
    'Failed to convert ... step 3/3' error; the innermost cause names the op."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def _first_line(error: BaseException) -> str:
    error = _root_cause(error)
    text = _ANSI.sub("", str(error)).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "#")):
            return f"{type(error).__name__}: {line[:240]}"
    return type(error).__name__


def export_torch(
    model: Any, config: ExportConfig, source_example: Any = None, *, output_names: Sequence[str] | None = None
) -> tuple[onnx.ModelProto, str, str | None, dict[str, torch.Tensor], list[str]]:
    """Export to an in-memory ModelProto. Returns (model, exporter used, why dynamo failed, examples, output names).

    ``output_names``: the graph's outputs, one per tensor forward() returns (default ``output``/``output_K``).
    """
    if isinstance(model, torch.nn.Module):
        model = model.eval()
    examples = _example_inputs(model, config, source_example)
    input_names = list(examples)
    try:
        with torch.inference_mode():
            reference = call_torch(model, examples)
    except Exception as e:
        shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in examples.items())
        raise ExportError(f"the model's forward failed on inputs {shapes}: {_first_line(e)}") from e
    n_outputs = len(_flatten_outputs(reference))
    if n_outputs == 0:
        raise ExportError("the model's forward returned no tensors")
    if output_names is not None and len(output_names) != n_outputs:
        raise ExportError(f"the model's forward returned {n_outputs} tensors for outputs {', '.join(output_names)}")
    output_names = (list(output_names) if output_names is not None
                    else ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)])
    axes = _dynamic_axes(config, input_names, output_names)
    external = _wants_external_data(model)

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
                        with silent_fds():
                            _export_torchscript(model, examples, path, config.opset, input_names, output_names, axes)
                proto = onnx.load(str(path), load_external_data=True)
            except Exception as e:
                failures.append(f"{exporter.value}: {_first_line(e)}")
                continue
            fallback = failures[0] if failures else None
            return proto, exporter.value, fallback, examples, output_names
    raise ExportError("export failed with every exporter tried: " + "; ".join(failures))


# ----------------------------------------------------------------------------------------------
# torch.export programs (.pt2)


def load_program(path: Path) -> torch.export.ExportedProgram:
    """Load a ``torch.export.save``d program, raising ExportError with the reason when it cannot.

    Pickles inside the archive are checked first and loaded weights-only (see _pt2_archive): a
    .pt2 cannot run code on load. The check and the load read the same open file.
    """
    from onnxforge.converters._pt2_archive import check_pt2_archive, weights_only_loads

    try:
        file = open(path, "rb")
    except OSError as e:
        raise ExportError(f"{path}: cannot be read ({e.strerror})") from e
    with file:
        check_pt2_archive(file, path)
        file.seek(0)
        try:
            with _quiet(), weights_only_loads():
                return torch.export.load(file)
        except Exception as e:
            raise ExportError(
                f"{path}: not a torch.export program ({_first_line(e)})",
                hint="save one with torch.export.save(torch.export.export(model, args), 'model.pt2')",
            ) from e


def _program_input_names(program: torch.export.ExportedProgram) -> list[str]:
    from torch.export.graph_signature import InputKind

    return [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind is InputKind.USER_INPUT and hasattr(spec.arg, "name")
    ]


class ProgramRunner:
    """Calls an ExportedProgram with flat feeds in graph-input order (the ONNX input order), packing
    them back into the (args, kwargs) structure it was exported with."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        self.program = program
        self.module = program.module()
        self.input_names = _program_input_names(program)

    def __call__(self, **feeds: torch.Tensor) -> Any:
        flat = list(feeds.values())
        args, kwargs = torch.utils._pytree.tree_unflatten(flat, self.program.call_spec.in_spec)
        return self.module(*args, **kwargs)


def export_program(
    program: torch.export.ExportedProgram, config: ExportConfig
) -> tuple[onnx.ModelProto, str, dict[str, torch.Tensor], list[str]]:
    """Export a torch.export program with the dynamo exporter. Returns (model, exporter, examples, output names).

    Its dynamic dims were chosen at torch.export time; --dynamic-batch / --dynamic cannot change them.
    """
    if config.exporter is Exporter.TORCHSCRIPT:
        raise UsageError("a torch.export program (.pt2) can only be exported with the dynamo exporter")
    if config.dynamic_batch or config.dynamic_axes:
        raise UsageError(
            "a .pt2 program fixed its dynamic dims when it was exported; --dynamic-batch/--dynamic cannot change them",
            hint="pass dynamic_shapes= to torch.export.export before torch.export.save",
        )
    input_names = _program_input_names(program)
    example_args, example_kwargs = program.example_inputs or ((), {})
    flat_examples = torch.utils._pytree.tree_leaves((example_args, example_kwargs or {}))
    examples = {n: t for n, t in zip(input_names, flat_examples, strict=False) if isinstance(t, torch.Tensor)}
    if len(examples) != len(input_names):
        raise ExportError(
            "the .pt2 program carries no example inputs for all its inputs; re-save it with torch.export.save"
        )
    runner = ProgramRunner(program)
    try:
        with torch.inference_mode():
            reference = runner(**examples)
    except Exception as e:
        raise ExportError(f"the .pt2 program failed on its own example inputs: {_first_line(e)}") from e
    n_outputs = len(_flatten_outputs(reference))
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    with tempfile.TemporaryDirectory(prefix="onnxforge-export-") as tmp:
        path = Path(tmp) / "program.onnx"
        try:
            with _quiet():
                torch.onnx.export(
                    program,
                    f=str(path),
                    dynamo=True,
                    external_data=_wants_external_data(program),
                    opset_version=max(config.opset or _DYNAMO_MIN_OPSET, _DYNAMO_MIN_OPSET),
                    input_names=input_names,
                    output_names=output_names,
                    optimize=True,
                )
            proto = onnx.load(str(path), load_external_data=True)
        except Exception as e:
            raise ExportError(f"the dynamo exporter failed on the .pt2 program: {_first_line(e)}") from e
    return proto, Exporter.DYNAMO.value, examples, output_names
