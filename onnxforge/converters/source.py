"""Resolving a SOURCE argument to a model object: ``file.py:callable``, a TorchScript ``.pt``,
a ``torch.export`` program ``.pt2``, a ``.keras`` file, an ``.onnx`` file, ``builtin:digits_cnn`` (the demo CNN),
or a Hugging Face ``save_pretrained`` folder (see hf_folder).

A callable may return the model, or ``(model, example_inputs)`` where example_inputs is a tuple of
tensors/arrays or a dict keyed by input name; example inputs fix the export shapes when no
``--input-shape`` is given.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxforge.errors import ExportError

if TYPE_CHECKING:
    from onnxforge.converters.config import HfTask
    from onnxforge.converters.hf_folder import HfModel

__all__ = [
    "SourceKind",
    "SourceModel",
    "SourceSpec",
    "is_python_source",
    "parse_source",
    "resolve_source",
    "source_files",
]


class SourceKind(enum.Enum):
    TORCH = "torch"
    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch.export"  # an ExportedProgram from a .pt2 file
    KERAS = "keras"
    ONNX = "onnx"
    TRANSFORMERS = "transformers"  # a Hugging Face save_pretrained folder


@dataclass
class SourceModel:
    kind: SourceKind
    description: str
    model: Any = None
    example_inputs: Any = None
    path: Path | None = None
    hf: HfModel | None = None  # a Hugging Face folder: its task, inputs and outputs (model is its module)


@dataclass(frozen=True)
class SourceSpec:
    """A SOURCE as written: the file it reads and, for ``file.py:callable``, the callable that builds the model."""

    path: Path
    callable: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.callable is None else f"{self.path}:{self.callable}"


def parse_source(source: str | os.PathLike) -> SourceSpec:
    """``file.py:callable`` -> SourceSpec(file.py, callable); any other SOURCE -> SourceSpec(its path).

    The split is at the last ``:``, and only when what comes before it ends in ``.py``: other colons
    (``builtin:NAME``, a drive letter) stay in the path. Whether the callable exists is not checked here.
    """
    text = str(source)
    path_text, sep, name = text.rpartition(":")
    if sep and path_text.endswith(".py"):
        return SourceSpec(Path(path_text), name)
    return SourceSpec(Path(text))


def is_python_source(source: str | os.PathLike) -> bool:
    """True for ``file.py:callable``: a source whose loading runs the user's Python code."""
    return parse_source(source).callable is not None


def source_files(source: str | os.PathLike) -> list[Path]:
    """The files SOURCE reads: the .py of ``file.py:callable``, the model file; none for ``builtin:NAME``."""
    text = str(source)
    if text.startswith("builtin:"):
        return []
    return [parse_source(text).path]


def _call_factory(path: Path, attr: str) -> Any:
    if not path.exists():
        raise ExportError(f"{path}: no such file")
    module_name = f"_onnxforge_source_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ExportError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        if e.name == "tensorflow" or (e.name or "").startswith("tensorflow."):
            raise ExportError(
                f"{path}: importing it failed: TensorFlow is not installed"
                + (" (KERAS_BACKEND=tensorflow)" if os.environ.get("KERAS_BACKEND") == "tensorflow" else ""),
                hint="install the 'tf' extra (TensorFlow and tf2onnx): pip install 'onnxforge[tf]'; "
                "or set KERAS_BACKEND=torch",
            ) from e
        raise ExportError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise ExportError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.pop(0)
    factory = getattr(module, attr, None)
    if factory is None:
        raise ExportError(f"{path}: defines no {attr!r}")
    if not callable(factory):
        raise ExportError(f"{path}:{attr} is not callable; it should return a model")
    try:
        return factory()
    except Exception as e:
        raise ExportError(f"{path}:{attr}() raised {type(e).__name__}: {e}") from e


def _classify(obj: Any, origin: str) -> SourceModel:
    example = None
    if isinstance(obj, tuple) and len(obj) == 2:
        obj, example = obj
    module_names = type(obj).__module__ + "." + " ".join(c.__module__ for c in type(obj).__mro__)
    # Before torch: with the torch backend a keras.Model is also a torch.nn.Module.
    if "keras" in module_names:
        return SourceModel(SourceKind.KERAS, origin, obj, example)
    if "torch" in module_names:
        import torch

        if isinstance(obj, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
            return SourceModel(SourceKind.TORCHSCRIPT, origin, obj, example)
        if isinstance(obj, torch.nn.Module):
            return SourceModel(SourceKind.TORCH, origin, obj, example)
        if isinstance(obj, torch.export.ExportedProgram):
            return SourceModel(SourceKind.TORCH_EXPORT, origin, obj, example)
    raise ExportError(
        f"{origin} returned a {type(obj).__name__}, not a model",
        hint="return a torch.nn.Module or a keras.Model (optionally as (model, example_inputs))",
    )


BUILTIN_MODELS = ("digits_cnn",)


def _builtin(text: str) -> SourceModel:
    name = text.split(":", 1)[1]
    if name != "digits_cnn":
        raise ExportError(f"{text}: unknown built-in model; built-ins are: {', '.join(BUILTIN_MODELS)}")
    import torch

    from onnxforge.converters.digits_cnn import load_pretrained

    example = {"image": torch.zeros(1, 1, 32, 32)}
    return SourceModel(SourceKind.TORCH, text, load_pretrained(), example)


def resolve_source(source: str | os.PathLike[str], task: HfTask | None = None) -> SourceModel:
    """Load what SOURCE names; raises ExportError with the reason when it cannot.

    ``task`` is for a Hugging Face folder (None: read from its config.json); other sources take none.
    """
    text = str(source)
    if text.startswith("builtin:"):
        return _builtin(text)
    spec = parse_source(text)
    if spec.callable is not None and spec.callable.isidentifier():
        return _classify(_call_factory(spec.path, spec.callable), str(spec))
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix == ".py":
        raise ExportError(f"{text}: name the function that builds the model, e.g. {text}:build_model")
    if not path.exists():
        raise ExportError(f"{text}: no such file")
    if path.is_dir():
        from onnxforge.converters.hf_folder import load_hf_folder

        hf = load_hf_folder(path, task)
        return SourceModel(SourceKind.TRANSFORMERS, str(path), hf.module, path=path, hf=hf)
    if suffix == ".onnx":
        return SourceModel(SourceKind.ONNX, str(path), path=path)
    if suffix in (".pt", ".pth", ".torchscript"):
        import torch

        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ExportError(
                f"{path}: not a TorchScript file ({type(e).__name__})",
                hint="a state_dict has no architecture; pass file.py:callable that builds and loads the model",
            ) from e
        return SourceModel(SourceKind.TORCHSCRIPT, str(path), model.eval(), path=path)
    if suffix == ".pt2":
        from onnxforge.converters.torch_export import load_program

        return SourceModel(SourceKind.TORCH_EXPORT, str(path), load_program(path), path=path)
    if suffix == ".keras":
        from onnxforge.converters.keras_export import load_keras_file

        return SourceModel(SourceKind.KERAS, str(path), load_keras_file(path), path=path)
    raise ExportError(
        f"{text}: unknown source type {suffix or '(no suffix)'!r}",
        hint="give file.py:callable, a TorchScript .pt, a torch.export .pt2, a .keras file, an .onnx file "
        "or a Hugging Face model folder",
    )
